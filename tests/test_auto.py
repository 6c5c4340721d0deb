"""`--guidance auto` (rcgdm/sweep/auto.py): a pilot that diverges means too strong, pilots keep the run's batches,
and a resumed run keeps the strengths the interrupted one chose."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import error_line, interrupt_at_image, read_rows, run_script

from rcgdm.pipeline import NonFiniteError, Scored
from rcgdm.sweep.auto import MAX_GUIDANCE, choose_guidance
from rcgdm.sweep.engine import SweepSettings


def pilot_pipe(predicted, calls: list):
    """A stand-in for the pipeline that the search calls (`sample` only): the predicted reward of each image at strength
    g is predicted(g); None raises NonFiniteError, as a diverged sample does. Records (strength, indices) per call."""

    def sample(prompt, steer, seed, indices, sampling, candidate=0, progress_bar=True):
        strength = 0.0 if steer is None else steer.guidance
        calls.append((strength, list(indices)))
        value = predicted(strength)
        if value is None:
            raise NonFiniteError("the final latents became NaN or inf")
        return Scored(torch.zeros(len(indices), 3, 4, 4), torch.full((len(indices),), value), None, None)

    return SimpleNamespace(sample=sample, predictor=SimpleNamespace(net=None),
                           base=SimpleNamespace(scheduler=SimpleNamespace(timesteps=range(5))))


SETTINGS = SweepSettings(num_images=8, batch_size=4, num_inference_steps=5, cfg=1.0)


def test_a_diverged_pilot_counts_as_too_strong_and_the_search_goes_on():
    calls = []
    pipe = pilot_pipe(lambda g: None if g >= 200 else g / 100, calls)  # reaches 1.0 at g = 100, diverges from 200 on
    reachable = choose_guidance(pipe, SETTINGS, "", 1.5, 0, tolerance=0.05)  # needs 150: between 100 and the divergence
    assert reachable.reached and abs(reachable.predicted - 1.5) <= 0.05 and 100 < reachable.guidance < 200
    unreachable = choose_guidance(pipe, SETTINGS, "", 3.0, 0, tolerance=0.05)  # would need 300: past the divergence
    assert not unreachable.reached and unreachable.guidance < 200 and math.isfinite(unreachable.predicted)
    diverged = [g for g, p in unreachable.pilot if p is None]
    assert diverged and min(diverged) >= 200 and max(g for g, _ in unreachable.pilot) < MAX_GUIDANCE  # stopped bracketing
    assert unreachable.guidance == max(g for g, p in unreachable.pilot if p is not None)  # the closest finite pilot
    json.dumps(unreachable.summary(), allow_nan=False)  # recordable: strict JSON


def test_an_unguided_pilot_that_diverges_is_the_models_fault_and_stops():
    with pytest.raises(NonFiniteError):
        choose_guidance(pilot_pipe(lambda g: None, []), SETTINGS, "", 1.0, 0, tolerance=0.05)


@pytest.mark.parametrize(("batch_size", "num_images", "expected"), [(4, 8, [[0, 1, 2, 3]]), (2, 8, [[0, 1], [2, 3]]),
                                                                     (3, 8, [[0, 1, 2], [3]]), (4, 2, [[0, 1]])])
def test_the_pilot_samples_the_runs_first_images_in_the_runs_batches(batch_size, num_images, expected):
    calls = []
    settings = SweepSettings(num_images=num_images, batch_size=batch_size, num_inference_steps=5, cfg=1.0)
    choose_guidance(pilot_pipe(lambda g: 0.0, calls), settings, "", 0.0, 0, tolerance=0.05)
    assert [indices for _, indices in calls] == expected


def test_a_resumed_auto_run_keeps_the_strengths_it_chose(tmp_path, monkeypatch, capsys, reward_model_path, predictor_path):
    args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--target", "1.0", "--guidance", "auto", "--auto_tolerance", "0.05", "--num_images", "4", "--bs", "2",
            "--num_inference_steps", "2", "--out_dir", tmp_path / "run"]
    interrupt_at_image(monkeypatch, 3)  # after batch 0 (images 0 and 1) was recorded
    assert run_script("inference.py", *args) == 130
    monkeypatch.undo()
    progress = tmp_path / "run" / "progress.json"
    saved = json.loads(progress.read_text())
    (recorded,) = saved["auto"].values()
    assert saved["settings"]["auto_search_on"] == "cpu/float32"

    saved["settings"]["auto_search_on"] = "cuda/float16"  # as if the interrupted run searched on a GPU
    progress.write_text(json.dumps(saved))
    assert run_script("inference.py", *args, "--resume") == 2
    assert "auto_search_on='cuda/float16', not 'cpu/float32'" in error_line(capsys.readouterr().err)

    saved["settings"]["auto_search_on"] = "cpu/float32"
    recorded["chosen_guidance"] += 7.0  # a strength the search would not choose again: the resumed run must use it
    progress.write_text(json.dumps(saved))
    monkeypatch.setattr("rcgdm.sweep.engine.choose_guidance", None)  # no second search
    assert run_script("inference.py", *args, "--resume") == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert len(rows) == 4 and {float(r["guidance_used"]) for r in rows[2:]} == {recorded["chosen_guidance"]}
    (combo,) = json.loads((tmp_path / "run" / "summary.json").read_text())["combinations"]
    assert combo["auto"]["chosen_guidance"] == recorded["chosen_guidance"]
