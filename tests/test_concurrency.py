"""Concurrent runs, and runs killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import torch
from conftest import ROOT, error_line, inference_args, latent_labels, popen, run_script, wait_for, weights
from safetensors.torch import load_file

from rcgdm.cli import UserError
from rcgdm.data import open_source
from rcgdm.distributed import batches
from rcgdm.latent_shards import shard_path, shard_problem
from rcgdm.latents import LatentSpec, encode, latent_row_shape, vae_fingerprint
from rcgdm.models import load_vae

# --- concurrent runs ------------------------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path, reward_model_path, predictor_path):
    from rcgdm.files.locking import locked

    out = tmp_path / "out"
    first = popen(*inference_args(out, reward_model_path, predictor_path, "--num_images", "64", "--bs", "2",
                                  "--num_inference_steps", "50"))  # a minute: it outlasts the second's start

    def first_holds_the_lock():
        if not (out / ".rcgdm.lock").exists():
            return False
        try:
            with locked(out / ".rcgdm.lock", "probe"):
                return False
        except UserError:
            return True

    wait_for(first_holds_the_lock, process=first)
    second = subprocess.run([sys.executable, *map(str, inference_args(out, reward_model_path, predictor_path))],
                            cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and "is in use by another run" in error_line(second.stderr)
    assert first.poll() is None  # the refused run left the running one alone; stop it (Ctrl-C) rather than wait,
    wait_for(lambda: (out / "progress.json").is_file(), process=first)  # once it has finished a batch
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130 and json.loads((out / "progress.json").read_text())["rows"]  # its images so far


def test_two_trainings_share_one_cache_and_encode_each_image_once(tmp_path):
    labels = latent_labels(tmp_path / "labels.npy", 64)

    def start(name):
        return popen("train.py", "--model=tiny-random", "--data=synthetic", "--num_data=64", "--image_size=64", "--num_epochs=1",
                     "--val_fraction=0", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
                     f"--out_path={tmp_path / name / 'convnet.pth'}")

    a, b = start("a"), start("b")
    assert a.wait(timeout=300) == 0 and b.wait(timeout=300) == 0
    encoded = [json.loads((tmp_path / n / "convnet.train_summary.json").read_text())["images_encoded"] for n in "ab"]
    assert sorted(encoded) == [0, 64]


# --- SIGKILL, then resume -------------------------------------------------------------------------------------------------------


def test_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """The uninterrupted run holds its latents in memory; the killed and resumed one streams them from the shards."""
    labels = latent_labels(tmp_path / "labels.npy", 512)

    def args(name, *extra):
        return ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=512", "--image_size=64", "--num_epochs=3",
                "--batch_size=8", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}", "--latents_per_shard=64",
                f"--out_path={tmp_path / name / 'convnet.pth'}", *extra]

    assert run_script(*args("whole")) == 0
    with open(tmp_path / "log.txt", "w") as log:
        killed = popen(*args("killed", "--latents_in_memory_gb=0"), log=log)
        # killed once the second epoch has taken a step (its progress bar says so), not after a fixed time
        wait_for(lambda: re.search(r"epoch 2/3:[^\r\n]*\| *[1-9]\d*/\d+", (tmp_path / "log.txt").read_text()), process=killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert not (tmp_path / "killed" / "convnet.pth").exists()
    assert "read from 8 shards batch by batch" in (tmp_path / "log.txt").read_text()
    assert run_script(*args("killed", "--latents_in_memory_gb=0", "--resume=True")) == 0
    a, b = weights(tmp_path / "whole/convnet.pth"), weights(tmp_path / "killed/convnet.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_killed_while_building_the_cache_keeps_its_whole_shards_and_encodes_the_rest(tmp_path):
    labels = latent_labels(tmp_path / "labels.npy", 1024)
    argv = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=1024", "--image_size=64", "--num_epochs=1",
            "--val_fraction=0", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
            f"--out_path={tmp_path / 'out' / 'convnet.pth'}", "--encode_batch_size=8", "--latents_per_shard=64"]
    with open(tmp_path / "log.txt", "w") as log:
        killed = popen(*argv, log=log)
        # killed once a shard and a batch more are encoded (the progress bar says so), most likely inside a shard
        wait_for(lambda: re.search(r"encoding latents:[^\r\n]*\| *(7[2-9]|[89]\d|[1-9]\d{2,3})/1024",
                                   (tmp_path / "log.txt").read_text()), process=killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    vae, source = load_vae("tiny-random"), open_source("synthetic")
    spec = LatentSpec(vae_fingerprint(vae), source.identity, 1024, 64, 0)
    (folder,) = (tmp_path / "cache").glob("latents-*")
    whole = [rows for rows in batches(1024, 64) if shard_path(folder, rows).exists()]
    row_shape = latent_row_shape(vae, 64)
    assert whole and all(shard_problem(folder, spec.describe(), rows, row_shape) is None for rows in whole)  # none half-written
    assert run_script(*argv) == 0
    encoded = json.loads((tmp_path / "out" / "convnet.train_summary.json").read_text())["images_encoded"]
    assert encoded == 1024 - 64 * len(whole)  # the shards the killed run finished are kept
    for rows in (range(0, 64), range(960, 1024)):  # one shard kept, one encoded by the second run: the one-go latents
        expected = encode(vae, source, spec, 8, torch.device("cpu"), batches(rows.stop, 8, rows.start), progress=False)
        assert torch.equal(load_file(folder / f"images-{rows.start:08d}-{rows.stop:08d}.safetensors")["latents"], expected)


def test_a_sweep_killed_midway_resumes_to_the_same_results(tmp_path, reward_model_path, predictor_path):
    extra = ["--target", "-4", "-2", "--guidance", "0", "10", "--num_images", "4", "--bs", "2", "--num_inference_steps", "10"]
    assert run_script(*inference_args(tmp_path / "whole", reward_model_path, predictor_path, *extra)) == 0
    killed = popen(*inference_args(tmp_path / "killed", reward_model_path, predictor_path, *extra))
    progress = tmp_path / "killed" / "progress.json"
    wait_for(lambda: progress.exists() and len(json.loads(progress.read_text())["rows"]) >= 4, process=killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "results.csv").exists()
    done = [tmp_path / "killed" / row["file"] for row in json.loads(progress.read_text())["rows"]]
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in done}
    assert run_script(*inference_args(tmp_path / "killed", reward_model_path, predictor_path, *extra)) == 2  # no silent overwrite
    assert run_script(*inference_args(tmp_path / "killed", reward_model_path, predictor_path, *extra, "--resume")) == 0
    assert (tmp_path / "whole/results.csv").read_bytes() == (tmp_path / "killed/results.csv").read_bytes()
    assert not progress.exists()
    # the finished batches' images were not redone: the same files, untouched; every image has the same bytes
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in done} == before
    folders = (tmp_path / "whole", tmp_path / "killed")
    whole, resumed = ({p.relative_to(d): p.read_bytes() for p in d.rglob("*_gt_*.png")} for d in folders)
    assert whole == resumed and len(whole) == 16
