"""Crafted files with the right format tag but wrong fields, and odd environments: one line naming the file and field."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, error_line, run_script, small_train_args

from rcgdm.cli import UserError

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
    ({"label_mean": 10**400}, "field 'label_mean' holds a int; expected a finite number"),  # beyond any float
    ({"val_loss": 1e39}, "field 'val_loss' is 1e\\+39; expected a finite number"),  # beyond float32, the dtype it is used in
    ({"posterior_levels": [0.0, 1.0], "posterior_variances": [1e39, 1.0]}, "expected variances from 2.94e-39 to 3.4e\\+38"),
    ({"posterior_levels": [0.0, 1.0], "posterior_variances": [10**400, 1.0]}, "expected variances from"),
    ({"posterior_levels": [0.0, 1.0], "posterior_variances": [1e-40, 1.0]}, "expected variances from"),  # 1 / v overflows
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
    from rcgdm.training_state import save_state

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
                  ("model", "nan"), ("history", [{"epoch": 1, "train_loss": 10**400}]),
                  ("history", [{"epoch": 1, "train_loss": 0.5, "val_loss": 1e39}])]  # beyond any float, beyond float32


@pytest.mark.parametrize(("field", "value"), CRAFTED_STATES)
def test_a_crafted_resume_state_names_the_field(tmp_path, field, value):
    from rcgdm.training_state import load_state

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
    assert run_script(*small_train_args(tmp_path, small_labels, out)) == 0
    state = out.with_suffix(".resume.pth")
    torch.save({**torch.load(state, weights_only=True), **other_shapes()}, state)
    shutil.rmtree(tmp_path / "cache")  # a resume that went on would encode again: it must stop first
    assert run_script(*small_train_args(tmp_path, small_labels, out, "--resume=True", "--num_epochs=2")) == 2
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
