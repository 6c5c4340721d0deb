"""Reliability: hostile and damaged files, bad input everywhere, concurrent runs, and SIGKILL + resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, latent_labels, popen, read_rows, run_script, wait_for, weights
from hypothesis import given, settings
from hypothesis import strategies as st

from rcgdm.cli import UserError
from rcgdm.config import parse_overrides


class WritesAMarker:
    """Unpickling this runs code: it would create the file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def hostile_checkpoint(path, marker):
    torch.save({"format": "rcgdm.predictor/1", "state_dict": {}, "payload": WritesAMarker(str(marker))}, path)
    return path


# --- hostile and damaged files --------------------------------------------------------------------------------------------------


def test_a_code_running_pickle_is_refused_everywhere(tmp_path, capsys, reward_model_path, predictor_path):
    marker = tmp_path / "pwned"
    bad = hostile_checkpoint(tmp_path / "bad.pth", marker)
    base = ["--model", "tiny-random", "--num_images", "1", "--num_inference_steps", "2", "--seed", "0",
            "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *base, "--reward_model", bad, "--predictor", predictor_path) == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)
    assert run_script("inference.py", *base, "--reward_model", reward_model_path, "--predictor", bad) == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)

    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((8, 1), np.float32))
    out = tmp_path / "train" / "convnet.pth"
    out.parent.mkdir()
    hostile_checkpoint(out.with_suffix(".resume.pth"), marker)
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=8", "--image_size=64", "--val_fraction=0",
            f"--labels_path={labels}"]
    assert run_script("train.py", *args, f"--out_path={out}", f"--cache_dir={tmp_path / 'cache'}", "--resume=True") == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)
    assert not marker.exists()


MARKER_MODULE = "from pathlib import Path\nPath({marker!r}).touch()\n\ndef f(images):\n    return images.mean((1, 2, 3))\n"


def user_code(tmp_path, name):
    """A module `name`.py whose import creates the file `pwned` beside it -> (module file, marker)."""
    marker = tmp_path / "pwned"
    module = tmp_path / f"{name}.py"
    module.write_text(MARKER_MODULE.format(marker=str(marker)))
    return module, marker


@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_reward_file_naming_user_code_never_runs_it(tmp_path, capsys, monkeypatch, predictor_path, kind):
    module, marker = user_code(tmp_path, "evil_reward")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable by name too, so only our refusal keeps it from running
    monkeypatch.chdir(tmp_path)
    spec = f"{module}:f" if kind == "file" else "evil_reward:f"
    crafted = tmp_path / "reward_model.pth"
    torch.save({"format": "rcgdm.reward/1", "reward": spec, "state_dict": {}}, crafted)
    out = tmp_path / "out"
    base = ["--model", "tiny-random", "--num_images", "1", "--num_inference_steps", "2", "--seed", "0", "--out_dir", out,
            "--reward_model", crafted, "--predictor", predictor_path]
    assert run_script(str(ROOT / "inference.py"), *base) == 2
    line = error_line(capsys.readouterr().err)
    assert f"records the user-code reward {spec!r}" in line and f"pass --reward {spec!r}" in line
    assert run_script(str(ROOT / "inference.py"), *base, "--reward", "other:f") == 2
    assert "does not match the reward" in error_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists()

    from rcgdm.rewards import load_reward

    reward, _ = load_reward(crafted, user_reward=spec)  # named by the user: now it may run
    assert marker.exists()
    assert torch.allclose(reward(torch.full((2, 3, 8, 8), 0.25)), torch.tensor([0.25, 0.25]))


@pytest.mark.parametrize(("field", "expected"), [
    (["a", "list"], "field 'reward' is ['a', 'list']; expected a reward name"),
    ("", "field 'reward' is ''; expected a reward name"),
    ("resnet50", "records the reward 'resnet50'; expected one of resnet18-random, compressibility, aesthetic"),
])
def test_a_reward_file_with_a_bad_reward_field_is_refused(tmp_path, field, expected):
    from rcgdm.rewards import load_reward

    crafted = tmp_path / "reward_model.pth"
    torch.save({"format": "rcgdm.reward/1", "reward": field, "state_dict": {}}, crafted)
    with pytest.raises(UserError) as refused:  # matched on the field, not on a path that holds "reward" anyway
        load_reward(crafted)
    assert expected in str(refused.value)


def test_a_model_folder_naming_another_library_is_refused_before_any_import(tmp_path, capsys, monkeypatch, tiny_model_dir):
    _, marker = user_code(tmp_path, "evil_library")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_library", "UNet"]}))
    from rcgdm.models import load_pipeline

    with pytest.raises(UserError, match="names a component from 'evil_library'"):
        load_pipeline(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="is a 'FluxPipeline': FLUX is guidance-distilled"):
        load_pipeline(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match=r"says StableDiffusionXLPipeline, but unet/config\.json has no 'text_time'"):
        load_pipeline(str(folder))
    assert not marker.exists()


def test_an_sd_label_on_an_sdxl_unet_is_refused_from_the_configs(tmp_path, monkeypatch):
    from rcgdm.models import ensure_built, load_pipeline

    folder = tmp_path / "model"
    shutil.copytree(ensure_built("tiny-sdxl-random"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    monkeypatch.setattr("diffusers.StableDiffusionPipeline.from_pretrained", None)  # refused before any weights load
    with pytest.raises(UserError, match=r"says StableDiffusionPipeline, but unet/config\.json has SDXL's 'text_time'"):
        load_pipeline(str(folder))


@pytest.mark.parametrize("steps", [1, 3])
def test_pndm_with_its_warm_up_on_too_few_steps_is_one_line(tmp_path, capsys, tiny_model_dir, predictor_path,
                                                            reward_model_path, steps):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "skip_prk_steps": False}))
    args = ["--model", folder, "--predictor", predictor_path, "--ignore_provenance", "--num_inference_steps", steps,
            "--reward_model", reward_model_path, "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args) == 2
    assert f"--num_inference_steps {steps} is too few for PNDMScheduler" in error_line(capsys.readouterr().err)
    from rcgdm.pipeline import RewardDirectedPipeline

    pipe = RewardDirectedPipeline.from_pretrained(str(folder), predictor_path, ignore_provenance=True)
    with pytest.raises(UserError, match=f"{steps} is too few for PNDMScheduler .*at least 4 steps"):
        pipe("", num_inference_steps=steps)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((8, 1), np.float32))
    train = [f"--model={folder}", "--data=synthetic", "--num_data=8", "--image_size=32", f"--labels_path={labels}",
             "--val_fraction=0", f"--num_inference_steps={steps}", f"--out_path={tmp_path / 'out' / 'c.pth'}",
             f"--cache_dir={tmp_path / 'c'}"]
    assert run_script("train.py", *train) == 2
    assert "at least 4 steps for PNDM's Runge-Kutta warm-up" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["reward_model", "predictor"])
def test_truncated_checkpoints_name_the_file(tmp_path, capsys, reward_model_path, predictor_path, which):
    paths = {"reward_model": reward_model_path, "predictor": predictor_path}
    broken = tmp_path / f"{which}.pth"
    broken.write_bytes(paths[which].read_bytes()[:5000])
    paths[which] = broken
    args = ["--model", "tiny-random", "--num_images", "1", "--seed", "0", "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args, "--reward_model", paths["reward_model"], "--predictor", paths["predictor"]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(broken) in line and "cannot be loaded safely" in line


def test_truncated_labels_name_the_file(tmp_path, capsys):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((64, 1), np.float32))
    labels.write_bytes(labels.read_bytes()[:100])
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=8", f"--labels_path={labels}",
            f"--out_path={tmp_path / 'c.pth'}"]
    assert run_script("train.py", *args) == 2
    line = error_line(capsys.readouterr().err)
    assert str(labels) in line and "not a readable .npy file" in line


# --- bad input: every script, every flag ----------------------------------------------------------------------------------------

FAKE_DATASET_BAD = [
    (["--num_data", "x"], "not an integer"),
    (["--num_data", "0"], "too small"),
    (["--num_data", "-1"], "too small"),
    (["--num_data", "1e9"], "not an integer"),
    (["--num_data", "999999"], "out of range"),
    (["--noise_std", "nan"], "not finite"),
    (["--noise_std=-inf"], "not finite"),
    (["--noise_std", "-1"], "negative"),
    (["--noise_std", "lots"], "not a number"),
    (["--seed", "1.5"], "not an integer"),
    (["--batch_size", "0"], "too small"),
    (["--weights", "resnet50"], "unknown"),
    (["--device", "gpu7"], "not a device"),
    (["--data", "MISSING"], "does not exist"),
    (["--data", "A_FILE"], "is a file"),
    (["--data", "EMPTY_DIR"], "holds no images"),
    (["--data", "synthetic:x"], "bad seed"),
    (["--out_dir", "A_FILE"], "is a file"),
    (["--out_dir", "UNDER_A_FILE"], "cannot be created"),
    (["--bogus", "1"], "unrecognized arguments"),
    (["--seed", "9223372036854775808"], "out of range"),
    (["--seed", "-1"], "out of range"),
    (["--out_dir", ""], "is empty"),
    (["--data", ""], "is empty"),
    (["--data_root", " "], "is empty"),
    (["--reward", ""], "is empty"),
]

TRAIN_BAD = [
    (["--lr=0"], "lr=0.0 is out of range"),
    (["--lr=-0.1"], "out of range"),
    (["--lr=nan"], "not a finite number"),
    (["--lr=inf"], "not a finite number"),
    (["--lr=fast"], "not a finite number"),
    (["--num_data=0"], "out of range"),
    (["--num_data=ten"], "not an integer"),
    (["--num_data=999999"], "needs at least that many"),
    (["--num_epochs=0"], "out of range"),
    (["--num_epochs=2.5"], "not an integer"),
    (["--batch_size=-1"], "out of range"),
    (["--image_size=65"], "a multiple of 8"),
    (["--image_size=0"], "a multiple of 8"),
    (["--num_inference_steps=0"], "from 1 to 1000"),
    (["--num_inference_steps=5000"], "from 1 to 1000"),
    (["--val_fraction=1"], "in [0, 1)"),
    (["--val_fraction=-0.1"], "in [0, 1)"),
    (["--seed=-1"], "out of range"),
    (["--encode_batch_size=0"], "out of range"),
    (["--resume=perhaps"], "not True or False"),
    (["--wandb=2"], "not True or False"),
    (["--device=tpu"], "not a device"),
    (["--data=MISSING"], "does not exist"),
    (["--labels_path=MISSING"], "does not exist"),
    (["--labels_path=A_DIR"], "does not exist"),
    (["--out_path=A_DIR"], "is a directory"),
    (["--out_path=UNDER_A_FILE/c.pth"], "cannot be created"),
    (["--cache_dir=A_FILE"], "is a file"),
    (["--model=no-such/model"], "could not be loaded"),
    (["--overwrite=2"], "not True or False"),
    (["--check_provenance=maybe"], "not True or False"),
    (["--nope=1"], "unknown key"),
    (["positional"], "is not --key=value"),
    (["--seed=9223372036854775808"], "out of range"),
    (["--out_path="], "is empty"),
    (["--cache_dir= "], "is empty"),
    (["--labels_path="], "is empty"),
    (["--data="], "is empty"),
    (["--data_root="], "is empty"),
    (["--model="], "is empty"),
    (["--labels_path=A_ZIP"], "is a zip archive"),
    (["--labels_path=A_PNG"], "not a readable .npy file"),
]

INFERENCE_BAD = [
    (["--target", "x"], "not a number"),
    (["--target", "nan"], "not finite"),
    (["--guidance=-inf"], "not finite"),
    (["--num_images", "0"], "too small"),
    (["--num_images", "2.5"], "not an integer"),
    (["--bs", "-2"], "too small"),
    (["--seed", "-7"], "out of range"),
    (["--seed", "one"], "invalid int value"),
    (["--prompt", "  "], "is blank"),
    (["--cfg", "nan"], "not finite"),
    (["--num_inference_steps", "0"], "too small"),
    (["--height", "63"], "not a multiple of 8"),
    (["--width", "0"], "too small"),
    (["--scheduler", "nope"], "unknown"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--device", "cuda:99"], "CUDA"),
    (["--model", "no-such/model"], "could not be loaded"),
    (["--reward_model", "MISSING"], "does not exist"),
    (["--reward_model", "A_DIR"], "is a directory"),
    (["--predictor", "A_FILE"], "cannot be loaded safely"),
    (["--out_dir", "A_FILE"], "is a file"),
    (["--resume"], "holds no interrupted run"),
    (["--target", "0", "-0"], "twice"),
    (["--prompt", "a dog", "a  dog"], "twice"),
    (["--guidance", "1", "1.0"], "twice"),
    (["--best_of", "2", "2"], "twice"),
    (["--target", "1e308"], "out of range"),
    (["--num_inference_steps", "2000"], "more than the 1000 training timesteps"),
    (["--height", "8192"], "up to 4096"),
    (["--reward", "other:f"], "does not match the reward"),
    (["--seed", "9223372036854775808"], "out of range"),
    (["--out_dir", ""], "is empty"),
    (["--model", ""], "is empty"),
    (["--predictor", ""], "is empty"),
    (["--reward_model", " "], "is empty"),
    (["--reward", ""], "is empty"),
    (["--scheduler", "SchedulerMixin"], "not a text-to-image sampler"),
    (["--scheduler", "DDIMInverseScheduler"], "not a text-to-image sampler"),
    (["--scheduler", "RePaintScheduler"], "not a text-to-image sampler"),
    (["--predictor", "A_PNG"], "is a PNG image, not a torch checkpoint"),
    (["--reward_model", "A_NPY"], "is a .npy array, not a torch checkpoint"),
    (["--predictor", "EMPTY_FILE"], "is empty, not a torch checkpoint"),
    (["--height", "128"], "was trained on 8x8 latents (64x64 images); this run samples 16x8"),
]


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("not a checkpoint")
    (tmp_path / "empty_file").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "image.pth", format="PNG")
    np.save(tmp_path / "array.npy", np.zeros((2, 1), np.float32))
    torch.save({"format": "rcgdm.reward/1"}, tmp_path / "archive.npy")  # a zip archive under a .npy name
    return {
        "EMPTY_FILE": str(tmp_path / "empty_file"),
        "A_PNG": str(tmp_path / "image.pth"),
        "A_NPY": str(tmp_path / "array.npy"),
        "A_ZIP": str(tmp_path / "archive.npy"),
        "MISSING": str(tmp_path / "missing"),
        "A_FILE": str(tmp_path / "a_file"),
        "A_DIR": str(tmp_path / "a_dir"),
        "EMPTY_DIR": str(tmp_path / "empty_dir"),
        "UNDER_A_FILE": str(tmp_path / "a_file" / "sub"),
    }


def swap(args, paths):
    """Replace the placeholders (MISSING, A_FILE, ...) by real paths."""
    out = []
    for arg in args:
        for key in sorted(paths, key=len, reverse=True):
            arg = arg.replace(key, paths[key])
        out.append(arg)
    return out


def names_the_value(line, args):
    """The error names the flag, or the bad value itself."""
    flag, _, value = args[0].lstrip("-").partition("=")
    value = value or (args[1] if len(args) > 1 else flag)
    return flag in line or value in line


def outputs(tmp_path):
    """Everything under the run's output folder: folders and lock files included (a refused run creates nothing)."""
    return sorted((tmp_path / "out").rglob("*")) + ([tmp_path / "out"] if (tmp_path / "out").exists() else [])


def assert_refused(capsys, tmp_path, script, base, args, expected):
    """`script base args` exits 2 with one error line that says `expected` and names the flag or value, creating nothing."""
    assert run_script(script, *base, *args) == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line and names_the_value(line, args)
    assert outputs(tmp_path) == []


@pytest.mark.parametrize(("args", "expected"), FAKE_DATASET_BAD)
def test_fake_dataset_bad_input(tmp_path, capsys, paths, args, expected):
    base = ["--data", "synthetic", "--weights", "none", "--num_data", "4", "--out_dir", tmp_path / "out"]
    assert_refused(capsys, tmp_path, "fake_dataset.py", base, swap(args, paths), expected)


@pytest.mark.parametrize(("args", "expected"), TRAIN_BAD)
def test_train_bad_input(tmp_path, capsys, paths, args, expected):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((16, 1), np.float32))
    base = ["--model=tiny-random", "--data=synthetic", "--num_data=8", "--image_size=64", "--num_epochs=1",
            f"--labels_path={labels}"]
    base += [f"--out_path={tmp_path / 'out' / 'convnet.pth'}", f"--cache_dir={tmp_path / 'out' / 'cache'}", "--val_fraction=0"]
    assert_refused(capsys, tmp_path, "train.py", base, swap(args, paths), expected)


@pytest.mark.parametrize(("args", "expected"), INFERENCE_BAD)
def test_inference_bad_input(tmp_path, capsys, paths, reward_model_path, predictor_path, args, expected):
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0"]
    base += ["--num_images", "1", "--num_inference_steps", "2", "--out_dir", tmp_path / "out"]
    assert_refused(capsys, tmp_path, "inference.py", base, swap(args, paths), expected)


DEFAULTS = {"lr": 0.001, "num_epochs": 100, "resume": False, "model": "tiny-random"}


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(min_size=1))
def test_override_parser_round_trips_typed_values(number, real, flag, text):
    got = parse_overrides(DEFAULTS, [f"--num_epochs={number}", "--lr", repr(real), f"--resume={flag}", f"--model={text}"])
    assert got == {"num_epochs": number, "lr": real, "resume": flag, "model": text}
    assert type(got["num_epochs"]) is int and type(got["lr"]) is float and type(got["resume"]) is bool


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["num_epochs", "lr", "resume"]), st.text())
def test_override_parser_never_crashes(key, text):
    try:
        got = parse_overrides(DEFAULTS, [f"--{key}={text}"])
    except UserError as err:
        assert key in str(err)
    else:
        assert type(got[key]) is type(DEFAULTS[key])


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="="), min_size=1).filter(lambda k: k not in DEFAULTS))
def test_override_parser_rejects_unknown_keys(key):
    with pytest.raises(UserError, match="valid keys: lr, num_epochs, resume, model"):
        parse_overrides(DEFAULTS, [f"--{key}=1"])


# --- concurrent runs ------------------------------------------------------------------------------------------------------------


def inference_args(out, reward_model_path, predictor_path, *extra):
    return ["inference.py", "--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path,
            "--seed", "0", "--out_dir", out, *extra]


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
    assert first.poll() is None  # the refused run left the running one alone; stop it (Ctrl-C) rather than wait
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
    labels = latent_labels(tmp_path / "labels.npy", 512)

    def args(name, *extra):
        return ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=512", "--image_size=64", "--num_epochs=3",
                "--batch_size=8", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
                f"--out_path={tmp_path / name / 'convnet.pth'}", *extra]

    assert run_script(*args("whole")) == 0
    with open(tmp_path / "log.txt", "w") as log:
        killed = popen(*args("killed"), log=log)
        # killed once the second epoch has taken a step (its progress bar says so), not after a fixed time
        wait_for(lambda: re.search(r"epoch 2/3:[^\r\n]*\| *[1-9]\d*/\d+", (tmp_path / "log.txt").read_text()), process=killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert not (tmp_path / "killed" / "convnet.pth").exists()
    assert run_script(*args("killed", "--resume=True")) == 0
    a, b = weights(tmp_path / "whole/convnet.pth"), weights(tmp_path / "killed/convnet.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_killed_while_building_the_cache_rebuilds_it(tmp_path):
    labels = latent_labels(tmp_path / "labels.npy", 1024)
    argv = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=1024", "--image_size=64", "--num_epochs=1",
            "--val_fraction=0", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
            f"--out_path={tmp_path / 'out' / 'convnet.pth'}", "--encode_batch_size=8"]
    with open(tmp_path / "log.txt", "w") as log:
        killed = popen(*argv, log=log)
        # killed once a batch is encoded (the progress bar says so) and the build is under way, not after a fixed time
        wait_for(lambda: re.search(r"encoding latents:[^\r\n]*\| *[1-9]\d*/1024", (tmp_path / "log.txt").read_text()),
                 process=killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert not list((tmp_path / "cache").glob("latents-*.safetensors"))  # nothing half-written under a final name
    assert run_script(*argv) == 0
    assert json.loads((tmp_path / "out" / "convnet.train_summary.json").read_text())["images_encoded"] == 1024


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


# --- data loss: no run overwrites what another run, or the user, made -----------------------------------------------------------


def train_args(tmp_path, labels, out_path, *extra):
    return ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1",
            "--val_fraction=0.25", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}", f"--out_path={out_path}",
            *extra]


@pytest.fixture
def small_labels(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.linspace(0, 1, 16, dtype=np.float32)[:, None])
    return labels


def test_train_never_writes_over_its_labels(tmp_path, capsys, small_labels):
    before = small_labels.read_bytes()
    assert run_script(*train_args(tmp_path, small_labels, small_labels, "--overwrite=True")) == 2  # the predictor on the labels
    assert "inputs are never outputs" in error_line(capsys.readouterr().err)
    side = tmp_path / "run.train_summary.json"  # labels named like a run's side file
    side.write_bytes(before)
    assert run_script(*train_args(tmp_path, side, tmp_path / "run.pth")) == 2
    assert "inputs are never outputs" in error_line(capsys.readouterr().err)
    assert small_labels.read_bytes() == side.read_bytes() == before


def test_two_trainings_in_one_folder_keep_their_own_files(tmp_path, capsys, small_labels):
    assert run_script(*train_args(tmp_path, small_labels, tmp_path / "out" / "one.pth")) == 0
    assert run_script(*train_args(tmp_path, small_labels, tmp_path / "out" / "two.pth", "--seed=1")) == 0
    for name in ("one", "two"):
        for suffix in (".pth", ".best.pth", ".metrics.jsonl", ".loss_curve.png", ".loss_by_noise.png", ".train_summary.json"):
            assert (tmp_path / "out" / f"{name}{suffix}").is_file(), (name, suffix)
    seeds = [json.loads((tmp_path / "out" / f"{n}.train_summary.json").read_text())["config"]["seed"] for n in ("one", "two")]
    assert seeds == [0, 1]
    # another run's side file as out_path, or the same out_path again: refused, files intact
    curve = (tmp_path / "out" / "one.loss_curve.png").read_bytes()
    for out_path in (tmp_path / "out" / "one.loss_curve.png", tmp_path / "out" / "one.pth"):
        assert run_script(*train_args(tmp_path, small_labels, out_path)) == 2
        line = error_line(capsys.readouterr().err)
        assert "already exists" in line and "overwrite=True" in line
    assert (tmp_path / "out" / "one.loss_curve.png").read_bytes() == curve
    assert run_script(*train_args(tmp_path, small_labels, tmp_path / "out" / "one.pth", "--overwrite=True", "--seed=2")) == 0
    assert json.loads((tmp_path / "out" / "one.train_summary.json").read_text())["config"]["seed"] == 2


def test_train_refuses_to_start_over_an_interrupted_run(tmp_path, capsys, small_labels):
    out = tmp_path / "out" / "convnet.pth"
    assert run_script(*train_args(tmp_path, small_labels, out)) == 0
    for path in (out, out.with_suffix(".train_summary.json")):
        path.unlink()  # as a run killed after an epoch leaves it: the resume state, no final files
    state = out.with_suffix(".resume.pth").read_bytes()
    assert run_script(*train_args(tmp_path, small_labels, out)) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds an interrupted run" in line and "resume=True" in line and "overwrite=True" in line
    assert out.with_suffix(".resume.pth").read_bytes() == state
    assert run_script(*train_args(tmp_path, small_labels, out, "--resume=True")) == 2  # already at num_epochs: one line
    assert "already finished epoch 1 of num_epochs=1" in error_line(capsys.readouterr().err)
    assert run_script(*train_args(tmp_path, small_labels, out, "--resume=True", "--num_epochs=2")) == 0


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
    assert run_script(*train_args(tmp_path, small_labels, out)) == 0
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((16, 1), np.float32))
    assert run_script(*train_args(tmp_path, other, out, "--resume=True", "--num_epochs=2")) == 2
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


# --- crafted files with the right format tag, but wrong fields; odd environments -----------------------------------------------


def crafted_predictor(tmp_path, predictor_path, **fields):
    checkpoint = {**torch.load(predictor_path, weights_only=True), **fields}
    torch.save(checkpoint, tmp_path / "crafted.pth")
    return tmp_path / "crafted.pth"


CRAFTED_PREDICTORS = [
    ({"latent_channels": "4"}, "field 'latent_channels'"),
    ({"latent_channels": None}, "field 'latent_channels'"),
    ({"state_dict": [1, 2]}, "field 'state_dict'"),
    ({"state_dict": {"layer1.conv1.weight": 5}}, "does not match"),
    ({"label_mean": torch.zeros(3)}, "field 'label_mean' holds a Tensor"),
    ({"reference_latents": torch.zeros(3)}, "field 'reference_latents'"),
    ({"reference_latents": "latents"}, "field 'reference_latents'"),
    ({"val_loss": float("inf")}, "field 'val_loss' is inf; expected a finite number"),
    ({"val_loss": "0.1"}, "field 'val_loss' is '0.1'"),
    ({"label_std": float("nan")}, "field 'label_std' is nan"),
    ({"latent_size": [8, "8"]}, "field 'latent_size'"),
    ({"noised": 1}, "field 'noised' is 1; expected true or false"),
    ({"family": ["sd"]}, "field 'family'"),
    ({"extra_note": float("inf")}, "field 'extra_note' holds NaN or inf"),
    ({"reference_latents": torch.zeros(1, 4, 8, 8).expand(10**6, 4, 8, 8)}, "not a finite, contiguous"),  # 1 TB as float
    ({"reference_latents": torch.zeros(1, 4, 1, 1).expand(4, 4, 10**6, 10**6)}, "not a finite, contiguous"),
    ({"reference_latents": torch.zeros(0, 4, 8, 8)}, "1 <= K <= 512"),
    ({"reference_latents": torch.zeros(2, 3, 8, 8)}, "field 'reference_latents'"),
    ({"reference_latents": torch.full((2, 4, 8, 8), float("inf"))}, "field 'reference_latents'"),
]


@pytest.mark.parametrize(("fields", "expected"), CRAFTED_PREDICTORS)
def test_a_crafted_predictor_names_the_field(tmp_path, predictor_path, fields, expected):
    from rcgdm.predictor import load_predictor

    path = crafted_predictor(tmp_path, predictor_path, **fields)
    with pytest.raises(UserError, match=expected) as err:
        load_predictor(path, latent_channels=4)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def fresh_training(channels: int = 4):
    from rcgdm.predictor import ThreeLayerConvNet

    net = ThreeLayerConvNet(channels)
    return net, torch.optim.Adam(net.parameters(), lr=1e-3), torch.Generator()


def saved_state(path, **fields):
    """A training state as train.py saves it after one epoch (one Adam step taken), with `fields` replaced."""
    from rcgdm.training import save_state

    net, optimizer, generator = fresh_training()
    net(torch.randn(2, 4, 8, 8)).sum().backward()
    optimizer.step()
    save_state(path, {}, 1, net, optimizer, generator, [{"epoch": 1, "train_loss": 0.5, "val_loss": None}])
    torch.save({**torch.load(path, weights_only=True), **fields}, path)
    return path


def other_shapes() -> dict:
    net, optimizer, _ = fresh_training(16)
    net(torch.randn(2, 16, 8, 8)).sum().backward()
    optimizer.step()
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict()}


CRAFTED_STATES = [("epoch", "3"), ("epoch", 0), ("history", {}), ("generator", [1]), ("config", 7), ("model", "other shapes"),
                  ("optimizer", "other shapes"), ("generator", torch.zeros(3, dtype=torch.uint8)), ("epoch", 2),
                  ("history", [{"epoch": 1, "train_loss": float("inf")}]), ("history", [{"epoch": 1, "train_loss": "0.5"}]),
                  ("model", "nan")]


@pytest.mark.parametrize(("field", "value"), CRAFTED_STATES)
def test_a_crafted_resume_state_names_the_field(tmp_path, field, value):
    from rcgdm.training import load_state

    if value == "other shapes":
        value = other_shapes()[field]
    if value == "nan":
        weights = fresh_training()[0].state_dict()
        value = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    path = saved_state(tmp_path / "s.pth", **{field: value})
    with pytest.raises(UserError, match=f"field '{field}'|weight .* holds NaN") as refused:
        load_state(path, {}, (), *fresh_training())
    assert "\n" not in str(refused.value)
    load_state(saved_state(tmp_path / "whole.pth"), {}, (), *fresh_training())  # the uncrafted state loads


def test_train_py_checks_a_resume_state_in_full_before_encoding(tmp_path, capsys, small_labels):
    out = tmp_path / "out" / "convnet.pth"
    assert run_script(*train_args(tmp_path, small_labels, out)) == 0
    state = out.with_suffix(".resume.pth")
    torch.save({**torch.load(state, weights_only=True), **other_shapes()}, state)
    shutil.rmtree(tmp_path / "cache")  # a resume that went on would encode again: it must stop first
    assert run_script(*train_args(tmp_path, small_labels, out, "--resume=True", "--num_epochs=2")) == 2
    assert "field 'model' does not fit the predictor" in error_line(capsys.readouterr().err)
    assert not any((tmp_path / "cache").iterdir())  # nothing was encoded


@pytest.mark.parametrize("rows", [[{"prompt": 1}], "rows", [{"prompt": "p", "target": 1, "guidance": 0, "best_of": 1, "image": 0,
                                                               "file": "../../etc/passwd"}]])
def test_a_crafted_progress_file_is_one_line(tmp_path, rows):
    from rcgdm.sweep.resume import ResumeLog

    (tmp_path / "progress.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    with pytest.raises(UserError, match="cannot be read"):
        ResumeLog.open(tmp_path, {}, resume=True, overwrite=False)


@pytest.mark.parametrize(("variable", "value", "expected"), [("WORLD_SIZE", "two", "WORLD_SIZE='two'"),
                                                             ("RCGDM_CACHE_DIR", "A_FILE", "RCGDM_CACHE_DIR")])
def test_odd_environment_variables_are_one_line(tmp_path, variable, value, expected):
    (tmp_path / "a_file").write_text("x")
    env = {**os.environ, variable: str(tmp_path / "a_file") if value == "A_FILE" else value}
    args = ["--model", "tiny-random", "--reward_model", tmp_path / "none.pth", "--out_dir", tmp_path / "out"]
    result = subprocess.run([sys.executable, "inference.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert expected in error_line(result.stderr) and not (tmp_path / "out").exists()


def test_a_script_run_in_the_test_process_leaves_no_global_state(tmp_path):
    """run_script puts back what a script changes for its process, so no test depends on which ran before it."""
    from accelerate.state import PartialState

    handler, rng = signal.getsignal(signal.SIGTERM), torch.get_rng_state()
    argv = list(sys.argv)
    args = ["--data", "synthetic", "--weights", "none", "--num_data", "4", "--seed", "5", "--out_dir", tmp_path / "out"]
    assert run_script("fake_dataset.py", *args) == 0  # it seeds torch and installs a SIGTERM handler
    assert signal.getsignal(signal.SIGTERM) is handler and torch.equal(torch.get_rng_state(), rng) and sys.argv == argv
    assert PartialState._shared_state == {}
