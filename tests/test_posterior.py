"""--guidance posterior end to end: train.py records the error curve, the API and inference.py apply 1 / sigma_t^2 from
it at each step, and a predictor without a curve (or with a damaged one) is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import error_line, inference_args, read_rows, run_script

from rcgdm.cli import InputError
from rcgdm.pipeline import RewardDirectedPipeline

CALL = {"target": 1.5, "num_images": 2, "seed": 5, "num_inference_steps": 3, "batch_size": 2}


def rewrite(source, path, **fields):
    """A copy of a predictor checkpoint with some metadata fields replaced (None: removed)."""
    checkpoint = torch.load(source, weights_only=True)
    for key, value in fields.items():
        if value is None:
            checkpoint.pop(key, None)
        else:
            checkpoint[key] = value
    torch.save(checkpoint, path)
    return path


def test_train_py_records_a_monotone_curve_from_its_validation_errors(predictor_path):
    checkpoint = torch.load(predictor_path, weights_only=True)
    levels, variances = checkpoint["posterior_levels"], checkpoint["posterior_variances"]
    # 128 validation latents: 16 bins of 8; alpha_bar rises with the bins, so the error falls
    assert len(levels) == len(variances) == 16 and levels == sorted(levels) and 0 < levels[0] < levels[-1] <= 1
    assert variances == sorted(variances, reverse=True) and variances[-1] > 0
    assert variances[-1] < 0.5 * variances[0]  # the least noisy inputs are predicted much better


def test_a_flat_curve_is_the_fixed_strength_it_stands_for(tmp_path, reward_model_path, predictor_path):
    """Variance 2^-7 at every level: the posterior strength is 128 at every step, so the images equal guidance 128's."""
    flat = rewrite(predictor_path, tmp_path / "flat.pth", posterior_levels=[0.0, 1.0], posterior_variances=[2**-7, 2**-7])
    pipe = RewardDirectedPipeline.from_pretrained("tiny-random", flat, reward_model_path)
    posterior, fixed = pipe("a nice photo", guidance="posterior", **CALL), pipe("a nice photo", guidance=128.0, **CALL)
    assert torch.equal(posterior.images, fixed.images)
    unguided = pipe("a nice photo", guidance=0.0, **CALL)
    assert (posterior.images - unguided.images).abs().max() > 1e-3


def test_a_posterior_sweep_records_its_strength(tmp_path, reward_model_path, predictor_path):
    args = inference_args(tmp_path / "run", reward_model_path, predictor_path, "--target", "1.5", "--guidance", "0",
                          "posterior", "--num_images", "2", "--bs", "2", "--num_inference_steps", "3")
    assert run_script(*args) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert [r["guidance"] for r in rows] == ["0.0", "0.0", "posterior", "posterior"]
    assert {r["guidance_used"] for r in rows[2:]} == {"posterior"} and {float(r["pilot_unet_calls"]) for r in rows} == {0}
    combos = json.loads((tmp_path / "run" / "summary.json").read_text())["combinations"]
    assert [c["guidance"] for c in combos] == [0.0, "posterior"]
    assert combos[1]["unet_calls_with_pilot"] == combos[1]["unet_calls"] == combos[0]["unet_calls"]  # no pilot
    assert (tmp_path / "run" / "reward_vs_target.png").is_file()


def test_a_predictor_without_a_curve_is_refused_in_one_line(tmp_path, capsys, reward_model_path, predictor_path):
    bare = rewrite(predictor_path, tmp_path / "bare.pth", posterior_levels=None, posterior_variances=None)
    args = inference_args(tmp_path / "run", reward_model_path, bare, "--guidance", "posterior", "--num_inference_steps", "2")
    assert run_script(*args) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: --guidance posterior needs the error curve") and "val_fraction > 0" in line
    assert not (tmp_path / "run").exists()
    pipe = RewardDirectedPipeline.from_pretrained("tiny-random", bare, reward_model_path)
    with pytest.raises(InputError, match="posterior needs the error curve"):
        pipe("a nice photo", guidance="posterior", **CALL)
    pipe("a nice photo", guidance=10.0, **CALL)  # numbers still work


@pytest.mark.parametrize(("levels", "variances", "expected"), [
    ([0.5, 0.2], [0.1, 0.2], "ascending levels in [0, 1]"),
    ([0.0, 1.5], [0.1, 0.2], "ascending levels in [0, 1]"),
    ([0.0, 1.0], [0.1, 0.0], "variances from 2.94e-39 to 3.4e+38"),
    ([0.0, 1.0], [0.1], "as many levels as variances"),
    ([0.0, "1"], [0.1, 0.2], "lists of 2 to 24 numbers"),
])
def test_a_damaged_curve_is_refused_in_one_line(tmp_path, reward_model_path, predictor_path, levels, variances, expected):
    damaged = rewrite(predictor_path, tmp_path / "damaged.pth", posterior_levels=levels, posterior_variances=variances)
    with pytest.raises(InputError, match="do not hold a curve") as err:
        RewardDirectedPipeline.from_pretrained("tiny-random", damaged, reward_model_path)
    assert expected in str(err.value) and err.value.name == "predictor"
