"""Bad input, every script and every flag: one line naming the value, exit status 2, nothing created."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import error_line, run_script
from hypothesis import given, settings
from hypothesis import strategies as st

from rcgdm.cli import FLOAT32_MAX, UserError
from rcgdm.config import parse_overrides

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
    (["--num_inference_steps=-1"], "from 1 to 1000, or 0 for the model family's own"),
    (["--num_inference_steps=5000"], "from 1 to 1000"),
    (["--val_fraction=1"], "in [0, 1)"),
    (["--lr=1e39"], "is not a finite number in float32's range"),
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
    (["--out_path=c.best.pth"], "side file of another run's predictor"),
    (["--out_path=c.resume.pth"], "side file of another run's predictor"),
    (["--out_path=c.metrics.jsonl"], "side file of another run's predictor"),
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
    (["--distilled_guidance", "1e308"], "beyond float32's range"),
    (["--guidance", "1e39"], "beyond float32's range"),
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
    (["--target", "1e9"], "out of range"),
    (["--target", "1e308"], "beyond float32's range"),
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
@given(st.integers(-(10**12), 10**12), st.floats(-FLOAT32_MAX, FLOAT32_MAX), st.booleans(), st.text(min_size=1))
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
