"""No run overwrites what another run, or the user, made; and nothing wrong is written silently."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import error_line, inference_args, read_rows, run_script, small_train_args


def test_train_never_writes_over_its_labels(tmp_path, capsys, small_labels):
    before = small_labels.read_bytes()
    # the predictor on the labels
    assert run_script(*small_train_args(tmp_path, small_labels, small_labels, "--overwrite=True")) == 2
    assert "inputs are never outputs" in error_line(capsys.readouterr().err)
    side = tmp_path / "run.train_summary.json"  # labels named like a run's side file
    side.write_bytes(before)
    assert run_script(*small_train_args(tmp_path, side, tmp_path / "run.pth")) == 2
    assert "inputs are never outputs" in error_line(capsys.readouterr().err)
    assert small_labels.read_bytes() == side.read_bytes() == before


def test_two_trainings_in_one_folder_keep_their_own_files(tmp_path, capsys, small_labels):
    assert run_script(*small_train_args(tmp_path, small_labels, tmp_path / "out" / "one.pth")) == 0
    assert run_script(*small_train_args(tmp_path, small_labels, tmp_path / "out" / "two.pth", "--seed=1")) == 0
    for name in ("one", "two"):
        for suffix in (".pth", ".best.pth", ".metrics.jsonl", ".loss_curve.png", ".loss_by_noise.png", ".train_summary.json"):
            assert (tmp_path / "out" / f"{name}{suffix}").is_file(), (name, suffix)
    seeds = [json.loads((tmp_path / "out" / f"{n}.train_summary.json").read_text())["config"]["seed"] for n in ("one", "two")]
    assert seeds == [0, 1]
    # another run's side file as out_path, or the same out_path again: refused, files intact
    curve = (tmp_path / "out" / "one.loss_curve.png").read_bytes()
    for out_path, expected in ((tmp_path / "out" / "one.loss_curve.png", "named like a side file of another run's"),
                               (tmp_path / "out" / "one.pth", "already exists")):
        assert run_script(*small_train_args(tmp_path, small_labels, out_path)) == 2
        assert expected in error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "one.loss_curve.png").read_bytes() == curve
    again = small_train_args(tmp_path, small_labels, tmp_path / "out" / "one.pth", "--overwrite=True", "--seed=2")
    assert run_script(*again) == 0
    assert json.loads((tmp_path / "out" / "one.train_summary.json").read_text())["config"]["seed"] == 2


def test_train_refuses_to_start_over_an_interrupted_run(tmp_path, capsys, small_labels):
    out = tmp_path / "out" / "convnet.pth"
    assert run_script(*small_train_args(tmp_path, small_labels, out)) == 0
    for path in (out, out.with_suffix(".train_summary.json")):
        path.unlink()  # as a run killed after an epoch leaves it: the resume state, no final files
    state = out.with_suffix(".resume.pth").read_bytes()
    assert run_script(*small_train_args(tmp_path, small_labels, out)) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds an interrupted run" in line and "resume=True" in line and "overwrite=True" in line
    assert out.with_suffix(".resume.pth").read_bytes() == state
    assert run_script(*small_train_args(tmp_path, small_labels, out, "--resume=True")) == 2  # already at num_epochs: one line
    assert "already finished epoch 1 of num_epochs=1" in error_line(capsys.readouterr().err)
    assert run_script(*small_train_args(tmp_path, small_labels, out, "--resume=True", "--num_epochs=2")) == 0


def test_a_sweep_never_replaces_an_earlier_sweeps_results(tmp_path, capsys, reward_model_path, predictor_path):
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--num_images", "1", "--num_inference_steps", "2", "--out_dir", tmp_path / "out", "--guidance", "0"]
    assert run_script("inference.py", *base, "--target", "1", "2") == 0
    results = (tmp_path / "out" / "results.csv").read_bytes()
    assert run_script("inference.py", *base, "--target", "3", "4") == 2  # other targets: no image clash, but the results
    line = error_line(capsys.readouterr().err)
    assert "results.csv" in line and "already exists" in line and "--overwrite" in line
    assert (tmp_path / "out" / "results.csv").read_bytes() == results
    assert not (tmp_path / "out" / "target3.0guidance0.0").exists()
    for flag in ("--reward_model", "--predictor"):  # an input where the run writes
        taken = tmp_path / "out" / "summary.json"
        args = [*base, "--target", "1", "2", "--overwrite"]
        args[args.index(flag) + 1] = taken
        assert run_script("inference.py", *args) == 2
        assert "inputs are never outputs" in error_line(capsys.readouterr().err)
    assert run_script("inference.py", *base, "--target", "3", "4", "--overwrite") == 0
    assert {r["target"] for r in read_rows(tmp_path / "out" / "results.csv")} == {"3.0", "4.0"}


def test_fake_dataset_never_replaces_earlier_labels(tmp_path, capsys):
    base = ["--data", "synthetic", "--weights", "none", "--num_data", "4", "--out_dir", tmp_path / "out"]
    assert run_script("fake_dataset.py", *base) == 0
    labels = (tmp_path / "out" / "cifar10_outputs_with_noise.npy").read_bytes()
    assert run_script("fake_dataset.py", *base, "--seed", "1") == 2
    line = error_line(capsys.readouterr().err)
    assert "already exists" in line and "--overwrite" in line
    assert (tmp_path / "out" / "cifar10_outputs_with_noise.npy").read_bytes() == labels
    assert run_script("fake_dataset.py", *base, "--seed", "1", "--overwrite") == 0
    assert (tmp_path / "out" / "cifar10_outputs_with_noise.npy").read_bytes() != labels


# --- silent wrong results -------------------------------------------------------------------------------------------------------


def test_nan_never_becomes_a_result(tmp_path, capsys, reward_model_path, predictor_path):
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--seed", "0", "--num_images", "1",
            "--num_inference_steps", "3", "--target", "1"]
    huge = ["--predictor", predictor_path, "--guidance", "1e30", "--out_dir", tmp_path / "a"]
    assert run_script("inference.py", *base, *huge) == 2
    line = error_line(capsys.readouterr().err)
    assert "NaN or inf" in line and "guidance 1e+30" in line
    assert not list((tmp_path / "a").rglob("*.png")) and not (tmp_path / "a" / "summary.json").exists()

    checkpoint = torch.load(predictor_path, weights_only=True)
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pth")
    assert run_script("inference.py", *base, "--predictor", tmp_path / "nan.pth", "--out_dir", tmp_path / "b") == 2
    line = error_line(capsys.readouterr().err)
    assert "holds NaN or inf" in line and key in line and not (tmp_path / "b").exists()

    with pytest.raises(ValueError):  # strict JSON: a NaN that slipped through would fail loudly, never be written
        from rcgdm.files.atomic import save_json

        save_json({"x": float("nan")}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def changed(path) -> None:
    """The checkpoint at `path` rewritten with its weights scaled by 1.01 (a retrained one at the same path)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, path)


@pytest.mark.parametrize("flag", ["--predictor", "--reward_model", "--model"])
def test_a_resumed_sweep_refuses_inputs_whose_content_changed(tmp_path, capsys, tiny_model_dir, reward_model_path,
                                                              predictor_path, flag):
    inputs = {"--predictor": tmp_path / "convnet.pth", "--reward_model": tmp_path / "reward_model.pth", "--model": tmp_path / "m"}
    shutil.copyfile(predictor_path, inputs["--predictor"])
    shutil.copyfile(reward_model_path, inputs["--reward_model"])
    shutil.copytree(tiny_model_dir, inputs["--model"])
    # the first combination finishes, the second stops (NaN): an interrupted run, its progress kept
    args = inference_args(tmp_path / "out", inputs["--reward_model"], inputs["--predictor"], "--num_images", "1",
                          "--num_inference_steps", "3", "--target", "1", "--guidance", "0", "1e30")
    args += ["--ignore_provenance"]
    args[args.index("--model") + 1] = inputs["--model"]
    assert run_script(*args) == 2
    assert "NaN or inf" in error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "progress.json").is_file()
    if flag == "--model":  # a file of the folder changed (its weights still load)
        weights = inputs["--model"] / "unet" / "diffusion_pytorch_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    else:
        changed(inputs[flag])
    assert run_script(*args, "--resume") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{flag} holds other content than in the interrupted run" in line


def test_train_resume_refuses_other_labels(tmp_path, capsys, small_labels):
    out = tmp_path / "out" / "convnet.pth"
    assert run_script(*small_train_args(tmp_path, small_labels, out)) == 0
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((16, 1), np.float32))
    assert run_script(*small_train_args(tmp_path, other, out, "--resume=True", "--num_epochs=2")) == 2
    line = error_line(capsys.readouterr().err)
    assert "labels_sha256" in line and "resume=False" in line


def test_labels_from_other_data_are_refused(tmp_path, capsys):
    step1 = ["--data", "synthetic:0", "--num_data", "16", "--weights", "none", "--out_dir", tmp_path]
    assert run_script("fake_dataset.py", *step1) == 0
    labels = tmp_path / "cifar10_outputs_with_noise.npy"
    base = ["--model=tiny-random", "--num_data=16", "--image_size=64", "--num_epochs=1", "--val_fraction=0",
            f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}"]
    assert run_script("train.py", *base, "--data=synthetic:1", f"--out_path={tmp_path / 'a.pth'}") == 2
    line = error_line(capsys.readouterr().err)
    assert "was made from 'synthetic:0'" in line and "check_provenance=False" in line
    assert not (tmp_path / "a.pth").exists()
    unchecked = ["--data=synthetic:1", "--check_provenance=False", f"--out_path={tmp_path / 'b.pth'}"]
    assert run_script("train.py", *base, *unchecked) == 0
    assert run_script("train.py", *base, "--data=synthetic", f"--out_path={tmp_path / 'c.pth'}") == 0  # synthetic = synthetic:0
    meta = torch.load(tmp_path / "c.pth", weights_only=True)
    sidecar = json.loads((tmp_path / "cifar10_outputs_with_noise.json").read_text())
    assert meta["reward_model_sha256"] == sidecar["reward_model_sha256"]


def test_inference_checks_the_predictor_belongs_to_the_reward_model(tmp_path, capsys):
    for name, seed in (("a", "0"), ("b", "1")):
        args = ["--data", "synthetic", "--num_data", "16", "--weights", "none", "--seed", seed, "--out_dir", tmp_path / name]
        assert run_script("fake_dataset.py", *args) == 0
    train = ["--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1", "--val_fraction=0",
             f"--labels_path={tmp_path / 'a' / 'cifar10_outputs_with_noise.npy'}", f"--cache_dir={tmp_path / 'cache'}",
             f"--out_path={tmp_path / 'a' / 'convnet.pth'}"]
    assert run_script("train.py", *train) == 0
    base = ["--num_images", "1", "--num_inference_steps", "2"]
    args = inference_args(tmp_path / "out", tmp_path / "b" / "reward_model.pth", tmp_path / "a" / "convnet.pth", *base)
    assert run_script(*args) == 2
    assert "another reward model" in error_line(capsys.readouterr().err) and not (tmp_path / "out").exists()
    args[args.index("tiny-random")] = str(tiny_random_copy(tmp_path))
    args[args.index(tmp_path / "b" / "reward_model.pth")] = tmp_path / "a" / "reward_model.pth"
    assert run_script(*args) == 2
    assert "trained on --model 'tiny-random'" in error_line(capsys.readouterr().err)
    assert run_script(*args, "--ignore_provenance") == 0


def tiny_random_copy(tmp_path):
    from rcgdm.models import ensure_built

    copy = tmp_path / "my-model"
    shutil.copytree(ensure_built("tiny-random"), copy)
    return copy
