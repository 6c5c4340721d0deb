"""A run's folder (rcgdm/files/run_folder.py): an overwrite replaces exactly the earlier run, a publish is never left
half done, nothing a user put there is deleted, and runs never write into each other's folders or into an input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import error_line, read_rows, run_script

from rcgdm.files import run_folder
from rcgdm.files.locking import LOCK_FILE, locked


@pytest.fixture
def sweep(tmp_path, reward_model_path, predictor_path):
    """Run a sweep into tmp_path/out with these flags -> its exit status."""

    def run(*flags, out=None):
        args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
                "--num_inference_steps", "2", "--bs", "4", "--out_dir", out or tmp_path / "out", *flags]
        return run_script("inference.py", *args)

    return run


def files(folder) -> dict:
    """Every file under `folder` -> its bytes (the lock aside)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def test_an_overwrite_leaves_no_file_of_the_earlier_run_and_every_file_of_the_user(tmp_path, sweep):
    out = tmp_path / "out"
    assert sweep("--target", "0.8", "1.2", "--guidance", "0", "5", "--num_images", "3") == 0
    assert (out / "reward_vs_distance.png").is_file()  # drawn: 3 images against the unguided ones
    (out / "notes.txt").write_text("mine")
    (out / "progress_notes.json").write_text("{}")  # named like a progress file, but not one
    (out / "target0.8guidance0.0" / "my_gt_1_pred_2.png").write_bytes(b"mine too")  # named like an image, but not one
    assert sweep("--target", "0.6", "1.5", "--guidance", "5", "--num_images", "2", "--overwrite") == 0
    rows = read_rows(out / "results.csv")
    assert {r["target"] for r in rows} == {"0.6", "1.5"}
    assert not (out / "reward_vs_distance.png").exists()  # the new run drew none: the earlier one's is gone
    written = json.loads((out / ".sweep.files.json").read_text())
    assert set(written) == {r["file"] for r in rows} | {"results.csv", "summary.json", "reward_vs_target.png",
                                                        "shift_vs_target.png", "reward_vs_compute.png", "grid.png"}
    left = set(files(out))
    assert left == set(written) | {".sweep.files.json", "notes.txt", "progress_notes.json",
                                   "target0.8guidance0.0/my_gt_1_pred_2.png"}
    assert not (out / "target1.2guidance5.0").exists()  # an earlier run's folder that held only its images


def test_an_overwrite_of_fake_dataset_and_train_keeps_what_they_did_not_write(tmp_path):
    out = tmp_path / "out"
    base = ["--data", "synthetic", "--num_data", "16", "--weights", "none", "--out_dir", out]
    assert run_script("fake_dataset.py", *base) == 0
    (out / "notes.txt").write_text("mine")
    assert run_script("fake_dataset.py", *base, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "cifar10_outputs_with_noise.json").read_text())["seed"] == 1
    train = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1",
             f"--labels_path={out / 'cifar10_outputs_with_noise.npy'}", f"--cache_dir={tmp_path / 'cache'}",
             f"--out_path={out / 'c.pth'}"]
    assert run_script(*train, "--val_fraction=0.25") == 0
    assert (out / "c.best.pth").is_file() and (out / "c.loss_by_noise.png").is_file()
    assert run_script(*train, "--val_fraction=0", "--overwrite=True") == 0  # no validation: no best, no loss by noise
    assert not (out / "c.best.pth").exists() and not (out / "c.loss_by_noise.png").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "reward_model.pth").is_file()


def staged_run(root):
    """An earlier run's files (a, old) and a staged new one (a, b, sub/c) -> the staging folder."""
    root.mkdir()
    for name in ("a", "old"):
        (root / name).write_text(f"earlier {name}")
    run_folder.record(root, "r", ["a", "old"])
    staging = run_folder.make_staging(root, "r")
    for name in ("a", "b", "sub/c"):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(f"new {name}")
    return staging


NEW = {"a": b"new a", "b": b"new b", "sub/c": b"new sub/c", ".r.files.json": b'[\n  "a",\n  "b",\n  "sub/c"\n]\n'}


def test_a_publish_killed_midway_is_finished_by_the_next_run(tmp_path, monkeypatch):
    root = tmp_path / "run"
    staging = staged_run(root)
    moves = []

    def killed_after_one_move(src, dst):
        if moves:
            raise SystemExit(137)  # as SIGKILL: nothing after this line runs
        moves.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(run_folder, "os", SimpleNamespace(replace=killed_after_one_move))
    with pytest.raises(SystemExit):
        run_folder.publish(root, "r", ["a", "b", "sub/c"], ["a", "old"])
    monkeypatch.undo()
    assert (root / "a").read_text() == "new a" and (root / "old").exists()  # a mix, with its plan beside it
    run_folder.recover(root, "r", root / LOCK_FILE, "the folder")
    assert files(root) == NEW and not staging.exists()


def test_ctrl_c_during_a_publish_waits_until_it_is_whole(tmp_path, monkeypatch):
    root = tmp_path / "run"
    staged_run(root)
    real_replace = os.replace

    def interrupted(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # held back until the publish ends
        real_replace(src, dst)

    monkeypatch.setattr(run_folder, "os", SimpleNamespace(replace=interrupted))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a script has it, whatever pytest inherited
    try:
        with pytest.raises(KeyboardInterrupt):
            run_folder.publish(root, "r", ["a", "b", "sub/c"], ["a", "old"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert files(root) == NEW


def test_an_interrupted_sweep_publish_is_finished_before_anything_else(tmp_path, monkeypatch, capsys, sweep):
    out = tmp_path / "out"
    assert sweep("--target", "1", "--guidance", "0", "5", "--num_images", "2") == 0
    real_replace, calls = os.replace, []

    def killed_midway(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise SystemExit(137)
        real_replace(src, dst)

    monkeypatch.setattr(run_folder, "os", SimpleNamespace(replace=killed_midway))
    assert sweep("--target", "2", "--guidance", "0", "5", "--num_images", "2", "--overwrite") == 137
    monkeypatch.undo()
    assert (out / ".sweep.publish.json").is_file()
    assert sweep("--target", "2", "--guidance", "0", "5", "--num_images", "2") == 2  # the new run is complete there
    assert "finished publishing an interrupted run's files" in capsys.readouterr().out
    assert not (out / ".sweep.publish.json").exists() and not (out / ".sweep.staging").exists()
    rows = read_rows(out / "results.csv")
    assert {r["target"] for r in rows} == {"2.0"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_gt_*.png")) == sorted(r["file"] for r in rows)


def test_the_earlier_run_check_is_made_again_holding_the_lock(tmp_path, monkeypatch, capsys, sweep):
    """Two runs started together both pass the first check; the second to take the lock must not replace the first."""
    import shutil

    from rcgdm.pipeline import RewardDirectedPipeline

    out, other = tmp_path / "out", tmp_path / "other"
    assert sweep("--num_images", "1", out=other) == 0  # what the other run will have written
    real = RewardDirectedPipeline.from_pretrained.__func__

    def another_run_finishes_meanwhile(cls, *args, **kwargs):  # between the first check and the lock
        shutil.copytree(other, out, dirs_exist_ok=True)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(RewardDirectedPipeline, "from_pretrained", classmethod(another_run_finishes_meanwhile))
    assert sweep("--num_images", "1", "--target", "3") == 2
    assert "already exists (an earlier run's output)" in error_line(capsys.readouterr().err)
    assert (out / "results.csv").read_bytes() == (other / "results.csv").read_bytes()  # the other run's, untouched


@pytest.mark.parametrize("where", ["inside", "around"])
def test_a_run_folder_inside_or_around_a_running_run_is_refused(tmp_path, capsys, sweep, where):
    running = tmp_path / "running" if where == "inside" else tmp_path / "parent" / "running"
    running.mkdir(parents=True)
    out = running / "inner" if where == "inside" else tmp_path / "parent"
    with locked(running / LOCK_FILE, "the running run"):
        assert sweep("--num_images", "1", out=out) == 2
        assert "lies inside or around the folder of a running run" in error_line(capsys.readouterr().err)
        fake = ["--data", "synthetic", "--num_data", "4", "--weights", "none", "--out_dir", out]
        assert run_script("fake_dataset.py", *fake) == 2
        assert "lies inside or around the folder of a running run" in error_line(capsys.readouterr().err)
    assert not list(out.rglob("*.png")) and not (out / "reward_model.pth").exists()


def test_trainings_whose_side_files_coincide_never_run_together(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    train = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=8", "--image_size=64", "--num_epochs=1",
             "--val_fraction=0", f"--labels_path={tmp_path / 'labels.npy'}", f"--cache_dir={tmp_path / 'cache'}"]
    with locked(out / ".a.lock", "a running a.pth"):  # as train.py holds it while training out_path=a.pth
        assert run_script(*train, f"--out_path={out / 'a.pt'}") == 2
    assert "is in use by another run" in error_line(capsys.readouterr().err)
    assert not list(out.glob("a.*"))


def test_outputs_never_go_into_a_model_folder_before_it_is_built_or_a_cached_snapshot(tmp_path, monkeypatch, capsys,
                                                                                        sweep, tiny_model_dir):
    import shutil

    monkeypatch.setenv("RCGDM_CACHE_DIR", str(tmp_path / "fresh-cache"))
    unbuilt = tmp_path / "fresh-cache" / "tiny-sdxl-random-v1"
    assert run_script("inference.py", "--model", "tiny-sdxl-random", "--out_dir", unbuilt / "out") == 2
    assert "is inside --model" in error_line(capsys.readouterr().err)
    assert not unbuilt.exists()  # refused before the build

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert sweep("--model", "org/tiny", out=snapshot / "out") == 2
    assert "is inside --model" in error_line(capsys.readouterr().err)
    assert not (snapshot / "out").exists()


def test_leftovers_of_killed_runs_go_and_a_lock_that_is_a_folder_is_one_line(tmp_path, capsys, sweep):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".results.csv.abc123.tmp"  # a killed writer's: nobody holds its lock
    leftover.write_text("half")
    alive = out / ".grid.png.abc123.tmp"  # a live writer's (this process holds its lock): left alone
    alive.write_text("busy")
    held = os.open(alive, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    for path in (leftover, alive):
        os.utime(path, (1e9, 1e9))  # both old: age alone decides nothing
    run_folder.make_staging(out, "sweep")  # an overwrite killed before it wrote its progress
    assert sweep("--num_images", "1") == 0
    assert not leftover.exists() and alive.exists() and not (out / ".sweep.staging").exists()
    os.close(held)

    other = tmp_path / "other"
    (other / LOCK_FILE).mkdir(parents=True)
    assert sweep("--num_images", "1", out=other) == 2
    assert f"the lock file {str(other / LOCK_FILE)!r}" in error_line(capsys.readouterr().err)
    fake = ["--data", "synthetic", "--num_data", "4", "--weights", "none", "--out_dir", other]
    assert run_script("fake_dataset.py", *fake) == 2
    assert "the lock file" in error_line(capsys.readouterr().err)


def test_a_full_disk_while_a_figure_is_saved_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys,
                                                                                         sweep):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    assert sweep("--num_images", "1") == 0
    earlier = files(out)

    def disk_full(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    assert sweep("--num_images", "1", "--target", "2", "--overwrite") == 2
    line = error_line(capsys.readouterr().err)
    assert "No space left on device writing" in line and "nothing half-written was kept" in line
    assert not list(out.rglob("*.tmp"))
    assert {k: v for k, v in files(out).items() if not k.startswith(".sweep.staging/")} == earlier  # the earlier run, whole
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((8, 1), np.float32))
    train = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=8", "--image_size=64", "--num_epochs=1",
             "--val_fraction=0", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
             f"--out_path={tmp_path / 'trained' / 'c.pth'}"]
    assert run_script(*train) == 2  # its loss curve meets the full disk
    assert "No space left on device writing" in error_line(capsys.readouterr().err)
    assert not list((tmp_path / "trained").rglob("*.tmp")) and not (tmp_path / "trained" / "c.pth").exists()


# A results folder handed over by someone else (to --resume, or copied with cp -a, rsync -a, tar) may hold a link
# `lnk -> ../outside` and a plan or a record naming `lnk/...`: nothing outside the folder may be removed, replaced or
# moved in, by any of the four scripts' recovery or by --overwrite.
def script_runs(tmp_path, reward_model_path=None, predictor_path=None) -> dict:
    """script -> (the run's name in its folder, its argv into tmp_path/out): each completes quickly if let through."""
    out = tmp_path / "out"
    sim = ["--dim=16", "--sub_dim=4", "--num_labelled=40", "--num_unlabelled=200", "--num_samples=100",
           "--predictor_epochs=2", "--conditional_steps=20", "--targets=0,1", "--particles="]
    labels = tmp_path / "labels.npy"
    np.save(labels, np.linspace(0, 1, 16, dtype=np.float32)[:, None])
    return {
        "fake_dataset.py": ("fake_dataset", ["fake_dataset.py", "--data", "synthetic", "--num_data", "8", "--weights",
                                             "none", "--out_dir", out, "--overwrite"]),
        "simulation.py": ("simulation", ["simulation.py", *sim, f"--out_dir={out}", "--overwrite=True"]),
        "train.py": ("c.train", ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64",
                                 "--num_epochs=1", "--val_fraction=0.25", f"--labels_path={labels}",
                                 f"--cache_dir={tmp_path / 'cache'}", f"--out_path={out / 'c.pth'}", "--overwrite=True"]),
        "inference.py": ("sweep", ["inference.py", "--model", "tiny-random", "--reward_model", reward_model_path or "r.pth",
                                   "--predictor", predictor_path or "p.pth", "--num_inference_steps", "1",
                                   "--num_images", "1", "--out_dir", out, "--overwrite"]),
    }


def planted(tmp_path):
    """tmp_path/out holding `lnk -> ../outside`, where the user's files lie -> (out, outside, their bytes)."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / ".bashrc").write_text("the user's own")
    (outside / "secret.txt").write_text("the user's secret")
    out.mkdir()
    (out / "lnk").symlink_to("../outside")
    return out, outside, files(outside)


def write_plan(out, run, written, remove, folder=None):
    from rcgdm.files import confined

    plan = {"folder": folder or confined.identity(out), "written": written, "remove": remove}
    (out / f".{run}.publish.json").write_text(json.dumps(plan))


ROUTES = ["delete", "replace", "move in", "move in through a link inside the staging folder", "a plan from elsewhere"]


@pytest.mark.parametrize("script", ["fake_dataset.py", "simulation.py", "train.py", "inference.py"])
def test_no_route_through_a_link_touches_a_file_outside_the_folder(tmp_path, capsys, script):
    """Each route of a planted plan, for each script's recovery: one line, and the outside folder as it was."""
    for k, route in enumerate(ROUTES):
        root = tmp_path / str(k)
        root.mkdir()
        out, outside, before = planted(root)
        run, argv = script_runs(root)[script]
        staging = out / f".{run}.staging"
        if route == "delete":
            write_plan(out, run, [], ["lnk/.bashrc"])
        elif route == "replace":
            run_folder.make_staging(out, run)
            (staging / "lnk").mkdir()
            (staging / "lnk" / ".bashrc").write_text("rm -rf ~")
            write_plan(out, run, ["lnk/.bashrc"], [])
        elif route == "move in":  # the staging folder itself a link to the user's files
            (outside / run_folder.MARKER).write_text("")
            before = files(outside)
            staging.symlink_to("../outside")
            write_plan(out, run, ["secret.txt"], [])
        elif route == "move in through a link inside the staging folder":
            run_folder.make_staging(out, run)
            (staging / "lnk").symlink_to("../../outside")
            write_plan(out, run, ["lnk/secret.txt"], [])
        else:  # a plan made for another folder, copied here: the files it would move in are staged, all real
            run_folder.make_staging(out, run)
            (staging / "mine.txt").write_text("planted")
            write_plan(out, run, ["mine.txt"], [], folder=[0, 0])
        capsys.readouterr()
        assert run_script(*argv) == 2, route
        line = error_line(capsys.readouterr().err)
        expected = {"a plan from elsewhere": "written for another folder", "move in": "neither in its staging folder"}
        assert expected.get(route, "passes through a symbolic link") in line, (route, line)
        assert files(outside) == before and (out / "lnk").is_symlink(), route
        assert not (out / "mine.txt").exists() and not (out / "secret.txt").exists(), route


@pytest.mark.parametrize("script", ["fake_dataset.py", "simulation.py", "train.py", "inference.py"])
def test_an_overwrite_never_removes_a_recorded_file_behind_a_link(tmp_path, capsys, script, reward_model_path,
                                                                   predictor_path):
    """A record of files naming `lnk/.bashrc`: --overwrite refuses before it writes anything; without the check each
    run here would complete and remove the user's file."""
    out, outside, before = planted(tmp_path)
    run, argv = script_runs(tmp_path, reward_model_path, predictor_path)[script]
    (out / f".{run}.files.json").write_text(json.dumps(["lnk/.bashrc"]))
    assert run_script(*argv) == 2
    assert "passes through a symbolic link (lnk)" in error_line(capsys.readouterr().err)
    assert files(outside) == before


def test_an_image_folder_that_is_a_link_is_refused_before_anything_is_written(tmp_path, capsys, sweep):
    out, outside, before = planted(tmp_path)
    (out / "target1.0guidance5.0").symlink_to("../outside")
    assert sweep("--target", "1", "--guidance", "0", "5", "--num_images", "1") == 2
    assert "passes through a symbolic link (target1.0guidance5.0)" in error_line(capsys.readouterr().err)
    assert files(outside) == before and not (out / "results.csv").exists()


def test_a_stop_that_arrives_while_a_run_publishes_ends_it_as_complete(tmp_path, capsys, monkeypatch):
    """SIGTERM during the publish of an overwrite: the run's files are all in place, and it exits 0 (not 130, which a
    scheduler would requeue and which would send --resume looking for an interrupted run)."""
    out = tmp_path / "out"
    base = ["fake_dataset.py", "--data", "synthetic", "--num_data", "8", "--weights", "none", "--out_dir", out]
    assert run_script(*base) == 0
    real_replace = os.replace

    def stopped(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)  # held back until the publish ends
        real_replace(src, dst)

    monkeypatch.setattr(run_folder, "os", SimpleNamespace(replace=stopped, kill=os.kill, getpid=os.getpid))
    capsys.readouterr()
    assert run_script(*base, "--seed", "1", "--overwrite") == 0
    assert "stopped after the run completed" in capsys.readouterr().err
    assert json.loads((out / "cifar10_outputs_with_noise.json").read_text())["seed"] == 1
    assert not (out / ".fake_dataset.publish.json").exists() and not (out / ".fake_dataset.staging").exists()


def test_a_leftover_is_judged_by_its_lock_never_by_a_process_id(tmp_path):
    """Another container, with the same host name and its own process ids, writes into a shared folder: its live
    temporary file (named, as before, with a host and a pid that is dead here) is left alone while its writer holds it,
    and removed once the writer is gone."""
    import socket

    from rcgdm.files.atomic import remove_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / f".results.csv.{socket.gethostname()}-{dead.pid}.abc123.tmp"
    path.write_text("being written")
    os.utime(path, (1e9, 1e9))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        remove_leftovers(tmp_path)
        assert path.read_text() == "being written"
    finally:
        holder.kill()
        holder.wait()
    remove_leftovers(tmp_path)
    assert not path.exists()


def test_a_running_run_is_found_however_deep_and_whoever_owns_its_lock(tmp_path, monkeypatch):
    """The nested-run check looks at every folder below (here past 20,000 entries, where it used to stop), and a lock
    this user cannot open for writing (another user's run, the lock read-only to others) still counts as held."""
    from rcgdm.cli import UserError
    from rcgdm.files.locking import refuse_if_locked
    from rcgdm.files.output_checks import refuse_nested_runs

    out = tmp_path / "out"
    (out / "zz" / "run").mkdir(parents=True)
    for k in range(20_001):
        (out / f"f{k}").touch()
    with locked(out / "zz" / "run" / LOCK_FILE, "a run"), pytest.raises(UserError, match="lies inside or around"):
        refuse_nested_runs(out, "--out_dir")

    lock = tmp_path / "other" / LOCK_FILE
    lock.parent.mkdir()
    real_open = os.open

    def as_another_user(path, flags, *args, **kwargs):  # the lock is read-only to this user: no write access
        if str(path) == str(lock) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    with locked(lock, "a run"):
        monkeypatch.setattr(os, "open", as_another_user)
        with pytest.raises(UserError, match="the folder is in use by another run"):
            refuse_if_locked(lock, "the folder")
        monkeypatch.undo()
    refuse_if_locked(lock, "the folder")  # free once the run ends
