"""simulation.py as a user runs it, at a reduced size, and the posterior strength's curve against the exact
Var(y | x_t) of the simulation's world."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from conftest import error_line, run_script

from rcgdm.sampling.posterior import PosteriorStrength, _nondecreasing, fit_curve
from rcgdm.simulation.figures import FIGURES
from rcgdm.simulation.theory import make_world
from rcgdm.training import noise_level

SMALL = ["--dim=16", "--sub_dim=4", "--num_labelled=120", "--num_unlabelled=3000", "--num_samples=600",
         "--predictor_epochs=60", "--conditional_steps=1500", "--targets=0,1,3", "--particles=1,16", "--particle_targets=1",
         "--particle_steps=60"]


def test_the_simulation_measures_the_three_claims(tmp_path, capsys):
    out = tmp_path / "sim"
    assert run_script("simulation.py", *SMALL, f"--out_dir={out}") == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["target"], r["sampler"]): r for r in summary["rows"]}
    assert len(rows) == 18 and all(isinstance(r[k], float) for r in rows.values() for k in ("reward_mean", "reward_std", "w2"))
    one, many = rows[1.0, "smc_1"], rows[1.0, "smc_16"]  # particles correct the level-blind proposal's too wide law
    assert many["reward_std"] < 0.6 * one["reward_std"] and many["w2"] < one["w2"], (one, many)
    assert 0 < many["final_ess"] < 1 and rows[1.0, "smc_calibrated_16"]["particles"] == 16
    for a in (0.0, 1.0, 3.0):
        exact = rows[a, "exact"]  # the answer's own draws: the theory's mean reward, within sampling error
        assert abs(exact["reward_mean"] - exact["exact_reward"]) < 4 * exact["reward_se"]
        # the posterior strength lands nearer the theory's reward than the paper's fixed 100, which overshoots
        assert abs(rows[a, "posterior"]["gap_to_exact"]) < abs(rows[a, "fixed"]["gap_to_exact"])
    for sampler in ("posterior", "conditional"):  # (ii) the reward follows the target
        rewards = [rows[a, sampler]["reward_mean"] for a in (0.0, 1.0, 3.0)]
        assert rewards[0] < rewards[1] < rewards[2], (sampler, rewards)
        assert abs(rows[1.0, sampler]["gap_to_exact"]) < 0.25
    for a in (0.0, 1.0):  # the calibrated predictor's likelihood samples the law, where the level-blind one is 4x too wide
        calibrated, posterior = rows[a, "posterior_calibrated"], rows[a, "posterior"]
        assert abs(calibrated["reward_std"] / calibrated["exact_reward_std"] - 1) < 0.25
        assert posterior["reward_std"] > 2 * posterior["exact_reward_std"]
        assert calibrated["w2"] < 0.5 * posterior["w2"] and abs(calibrated["gap_to_exact"]) < 0.05
    assert summary["calibration"]["ratio"] is not None and all(0.7 < r < 1.4 for r in summary["calibration"]["ratio"])
    assert summary["conditional_model"]["principal_angle_deg"] < 15  # (i) the subspace is recovered
    assert summary["conditional_model"]["off_subspace"] < 0.03  # and the samples lie on it
    assert rows[3.0, "posterior"]["w2"] > rows[1.0, "posterior"]["w2"]  # (iii) leaving the labels' range costs fidelity
    assert all((out / name).stat().st_size > 1000 for name in FIGURES)
    assert "largest principal angle" in capsys.readouterr().out

    before = (out / "summary.json").read_bytes()
    assert run_script("simulation.py", *SMALL, f"--out_dir={out}") == 2
    assert "already exists" in capsys.readouterr().err and (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize(("flag", "message"), [("--targets=1,x", "--targets='1,x' is not a list"),
                                               ("--particles=4,x", "--particles='4,x' is not a list of distinct counts"),
                                               ("--particle_targets=5", "--particle_targets=5 are not all among --targets"),
                                               ("--sub_dim=64", "--sub_dim=64 is out of range"),
                                               ("--num_samples=8", "--num_samples=8 is out of range"),
                                               ("--dim=300000", "--dim=300000 is out of range; expected an integer "
                                                                "from 2 to 4096"),
                                               ("--noise_std=1e300", "--noise_std='1e300' is not a finite number"),
                                               ("--targets=0,1e300", "--targets='0,1e300' is not a list"),
                                               ("--targets=0,nan", "--targets='0,nan' is not a list"),
                                               ])
def test_bad_settings_are_one_line(tmp_path, capsys, flag, message):
    assert run_script("simulation.py", flag, f"--out_dir={tmp_path / 'sim'}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and not (tmp_path / "sim").exists()


def test_a_run_larger_than_the_machines_memory_is_one_line_before_anything_is_allocated(tmp_path, capsys):
    flags = ["--dim=4096", "--num_unlabelled=10000000", "--num_samples=5000", f"--out_dir={tmp_path / 'sim'}"]
    assert run_script("simulation.py", *flags) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: --dim=4096 with --num_unlabelled=10000000 and --num_samples=5000 needs at least "
                           "1.03e+03 GB (1.02e+03 GB of points, 1.07 GB of covariances), more than the")
    assert not (tmp_path / "sim").exists()


def test_the_curve_of_exact_errors_is_the_exact_label_variance():
    """Squared errors of the exact E[y | x_t] at the DDIM schedule's levels: the fitted curve is Var(y | x_t)."""
    world = make_world(16, 4, 0.1, 0.0, torch.Generator().manual_seed(0))
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(1)
    timesteps = scheduler.timesteps.repeat_interleave(400)
    levels = noise_level(scheduler, timesteps)
    s, n = levels.sqrt()[:, None], (1 - levels).sqrt()[:, None]
    x0 = world.sample_data(len(levels), generator)
    x_t = s * x0 + n * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    y = x0 @ world.theta + 0.1 * torch.randn(len(x0), generator=generator, dtype=torch.float64)
    mean = torch.stack([x_t[i] @ world.label_weights(float(s[i]), float(n[i])) for i in range(len(x0))])
    curve = fit_curve(levels, (y - mean) ** 2, flow=False)
    assert len(curve["levels"]) == 24 and curve["levels"] == sorted(curve["levels"])
    strength = PosteriorStrength.from_curve(curve)
    for level, variance in zip(curve["levels"], curve["variances"], strict=True):
        exact = world.label_var_given(level**0.5, (1 - level) ** 0.5)
        assert variance == pytest.approx(exact, rel=0.2, abs=0.002)
        assert float(strength(torch.tensor(level, dtype=torch.float64))) == pytest.approx(1 / variance)
    # from Var y at the most noise (a strength near 1) to near the label noise 0.1^2 (the paper's 100) at the least
    strengths = [1 / v for v in curve["variances"]]
    assert strengths == sorted(strengths) and strengths[0] == pytest.approx(1 / world.label_var, rel=0.2)
    assert strengths[-1] > 50


def test_the_strength_interpolates_linearly_and_the_fit_is_monotone():
    strength = PosteriorStrength((0.2, 0.6), (0.5, 0.1))
    assert float(strength(torch.tensor(0.4))) == pytest.approx(1 / 0.3)
    assert float(strength(torch.tensor(0.0))) == pytest.approx(2) and float(strength(torch.tensor(0.9))) == pytest.approx(10)
    assert _nondecreasing([1.0, 3.0, 2.0, 4.0], [1, 1, 1, 1]) == [1.0, 2.5, 2.5, 4.0]
    assert _nondecreasing([3.0, 1.0], [1, 3]) == [1.5, 1.5]


def test_the_learned_networks_start_from_the_seed_and_leave_the_global_rng_alone():
    from rcgdm.simulation.learned import mlp

    before = torch.get_rng_state()
    first, second = (mlp(4, 1, 8, torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    assert torch.equal(torch.get_rng_state(), before)
    assert first[0].weight.dtype == torch.float64


def test_a_diverged_sampler_is_recorded_as_diverged_not_as_numbers(tmp_path, capsys):
    tiny = ["--dim=16", "--sub_dim=4", "--num_labelled=40", "--num_unlabelled=200", "--num_samples=100",
            "--predictor_epochs=2", "--conditional_steps=20", "--targets=0,5", "--fixed_guidance=1e8", "--particles=",
            "--particle_targets=0"]
    assert run_script("simulation.py", *tiny, f"--out_dir={tmp_path / 'sim'}") == 0
    rows = json.loads((tmp_path / "sim" / "summary.json").read_text())["rows"]  # strict JSON: no NaN in it
    fixed = [r for r in rows if r["sampler"] == "fixed"]
    assert len(fixed) == 2 and all(r["diverged"] and r["reward_mean"] is None and r["w2"] is None for r in fixed)
    assert [r["sampler"] for r in rows if r["sampler"].startswith("smc")] == ["smc_calibrated_16"]  # --particles='': none
    assert not any(r["diverged"] for r in rows if r["sampler"] != "fixed")
    assert capsys.readouterr().out.count("diverged (NaN, inf or too large)") == 2
    assert (tmp_path / "sim" / "reward_vs_target.png").stat().st_size > 1000


def test_the_bound_summarizes_worlds_and_fits_the_rate_it_was_given(tmp_path):
    """Shortfalls made to fall as 2 n^-1/2 (times 1.1 and 0.9 in two worlds) give slope -1/2, their mean and standard
    error; the figure is drawn from them."""
    from rcgdm.simulation.bound import LABELLED, SAMPLERS, SHARES, slopes, summarize
    from rcgdm.simulation.figures import BOUND_FIGURE, draw_bound

    rows = [{"off_subspace_share": share, "num_labelled": n, "seed": k, "sampler": name,
             "shortfall": -2 * n**-0.5 * (1.1 if k else 0.9), "w2": 0.2 + k * 0.01, "off_subspace": 0.01}
            for share in SHARES for n in LABELLED for k in (0, 1) for name in SAMPLERS]
    table = summarize(rows)
    entry = next(r for r in table if (r["num_labelled"], r["sampler"], r["off_subspace_share"]) == (200, "conditional", 0.1))
    assert entry["shortfall"] == pytest.approx(2 / 200**0.5) and entry["shortfall_se"] == pytest.approx(0.1 * 2 / 200**0.5)
    assert entry["w2"] == pytest.approx(0.205) and entry["w2_se"] == pytest.approx(0.005)
    fitted = slopes(table)
    assert len(fitted) == len(SHARES) * len(SAMPLERS) and all(v == pytest.approx(-0.5) for v in fitted.values())
    draw_bound({"table": table}, tmp_path)
    assert (tmp_path / BOUND_FIGURE).stat().st_size > 1000


def test_bad_bound_settings_are_one_line(tmp_path, capsys):
    assert run_script("simulation.py", "--bound=True", "--bound_seeds=0", f"--out_dir={tmp_path / 'b'}") == 2
    assert error_line(capsys.readouterr().err).startswith("error: --bound_seeds=0 is out of range")
    assert not (tmp_path / "b").exists()
