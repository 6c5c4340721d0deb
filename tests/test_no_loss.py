"""Nothing is lost: an --overwrite run that fails leaves the earlier outputs as they were, and no output goes into an input."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from conftest import error_line, popen, read_rows, run_script, wait_for

from rcgdm.files.atomic import atomic_folder
from rcgdm.models import TINY_FOLDER
from rcgdm.tiny.manifest import verify_manifest


def snapshot(folder) -> dict:
    """Every file under `folder` (hidden staging folders aside) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def test_a_failing_overwrite_sweep_leaves_the_earlier_sweep_as_it_was(tmp_path, capsys, reward_model_path, predictor_path):
    out = tmp_path / "out"
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--num_images", "2", "--bs", "1", "--num_inference_steps", "2", "--out_dir", out, "--target", "1"]
    assert run_script("inference.py", *base, "--guidance", "0", "5") == 0
    earlier = snapshot(out)
    assert len([name for name in earlier if name.endswith(".png") and "_gt_" in name]) == 4
    # the replacement samples its first combination (images written), then the second turns NaN midway
    assert run_script("inference.py", *base, "--guidance", "0", "1e30", "--seed", "1", "--overwrite") == 2
    assert "became NaN or inf" in error_line(capsys.readouterr().err)
    assert list((out / ".sweep.staging").rglob("*_gt_*.png"))  # the failed run did write images, in its staging folder
    assert snapshot(out) == earlier  # and every earlier file is as it was
    assert run_script("inference.py", *base, "--guidance", "0", "5") == 2  # an unfinished overwrite: not silently dropped
    assert "holds an interrupted run" in error_line(capsys.readouterr().err)
    assert run_script("inference.py", *base, "--guidance", "0", "5", "--seed", "1", "--overwrite") == 0
    assert not (out / ".sweep.staging").exists()
    rows = read_rows(out / "results.csv")
    assert {r["guidance"] for r in rows} == {"0.0", "5.0"} and {r["seed"] for r in rows} == {"1"}
    images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_gt_*.png"))
    assert images == sorted(r["file"] for r in rows)  # the earlier images went, no stray one is left
    assert snapshot(out)["results.csv"] != earlier["results.csv"]


def test_an_overwrite_sweep_killed_midway_keeps_the_earlier_one_and_resumes(tmp_path, reward_model_path, predictor_path):
    out = tmp_path / "out"
    base = ["inference.py", "--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path,
            "--num_images", "4", "--bs", "1", "--num_inference_steps", "4", "--out_dir", out, "--target", "1",
            "--guidance", "3"]
    assert run_script(*base, "--seed", "0") == 0
    earlier = snapshot(out)
    killed = popen(*base, "--seed", "1", "--overwrite")
    progress = out / ".sweep.staging" / "progress.json"
    wait_for(lambda: progress.exists() and len(json.loads(progress.read_text())["rows"]) >= 2, process=killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert snapshot(out) == earlier
    assert run_script(*base, "--seed", "1", "--overwrite", "--resume") == 0
    assert {r["seed"] for r in read_rows(out / "results.csv")} == {"1"}
    assert len(list(out.glob("*_gt_*.png"))) == 4 and not (out / ".sweep.staging").exists()


def test_a_failing_overwrite_training_leaves_the_earlier_one_as_it_was(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.linspace(0, 1, 64, dtype=np.float32)[:, None])
    out = tmp_path / "out" / "convnet.pth"
    base = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=64", "--image_size=64", "--val_fraction=0.25",
            "--batch_size=4", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}", f"--out_path={out}"]
    assert run_script(*base, "--num_epochs=1") == 0
    earlier = snapshot(out.parent)
    assert set(earlier) >= {"convnet.pth", "convnet.best.pth", "convnet.resume.pth", "convnet.metrics.jsonl"}
    killed = popen(*base, "--num_epochs=50", "--seed=1", "--overwrite=True")
    staged = out.parent / ".convnet.train.staging" / "convnet.resume.pth"
    wait_for(staged.exists, process=killed)  # an epoch of the replacement is done
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert snapshot(out.parent) == earlier
    assert run_script(*base, "--num_epochs=2", "--seed=1") == 2  # an unfinished overwrite is not silently dropped
    assert run_script(*base, "--num_epochs=2", "--seed=1", "--overwrite=True") == 0
    summary = json.loads(out.with_suffix(".train_summary.json").read_text())
    assert summary["config"]["seed"] == 1 and summary["epochs"] == 2
    assert not (out.parent / ".convnet.train.staging").exists()


def test_outputs_inside_an_input_folder_are_refused(tmp_path, capsys, reward_model_path, predictor_path):
    before = snapshot(TINY_FOLDER)
    run = ["--model", "tiny", "--reward_model", reward_model_path, "--predictor", predictor_path, "--ignore_provenance"]
    assert run_script("inference.py", *run, "--out_dir", TINY_FOLDER / "samples") == 2
    assert "--out_dir" in (line := error_line(capsys.readouterr().err)) and "is inside --model" in line
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for k in range(4):
        Image.new("RGB", (8, 8), (k * 60, 0, 0)).save(images / f"{k}.png")
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((4, 1), np.float32))
    train = ["--model=tiny", f"--data={images}", "--num_data=4", "--image_size=32", f"--labels_path={labels}"]
    for inside in ([f"--out_path={images / 'c.pth'}", f"--cache_dir={tmp_path / 'cache'}"],
                   [f"--out_path={tmp_path / 'c.pth'}", f"--cache_dir={TINY_FOLDER / 'cache'}"]):
        assert run_script("train.py", *train, *inside) == 2
        assert "is inside" in error_line(capsys.readouterr().err)
    fake = ["--data", images, "--weights", "none", "--num_data", "4", "--out_dir", images / "labels"]
    assert run_script("fake_dataset.py", *fake) == 2
    assert "--out_dir" in (line := error_line(capsys.readouterr().err)) and "is inside --data" in line
    assert snapshot(TINY_FOLDER) == before and sorted(p.name for p in images.iterdir()) == [f"{k}.png" for k in range(4)]
    verify_manifest(TINY_FOLDER)
    assert not (tmp_path / "c.pth").exists() and not (tmp_path / "cache").exists()


def test_a_model_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as folder:
        (folder / "half.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "model") as folder:
        (folder / "whole.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (tmp_path / "model" / "whole.json").is_file()
