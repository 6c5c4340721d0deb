"""The particle sampler (rcgdm/sampling/particles.py) against known answers: its ancestral step is diffusers' DDPM and Euler
ancestral steps, and for flow models keeps the flow's marginals exactly; systematic resampling; and in the simulation's
Gaussian world its law against p(x0 | y = a): exact as the particles grow however poor the proposal, no worse than
guidance with the exact predictor, and off when the final likelihood is wrong."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from rcgdm.sampling.guidance import RewardGuidance, signal_and_noise
from rcgdm.sampling.particles import Draws, ancestral_step, sample_particles, systematic
from rcgdm.sampling.schedulers import next_levels, noise_levels
from rcgdm.simulation.measures import fitted_w2
from rcgdm.simulation.oracle import ExactLabelLaw, ExactLabelMean, ExactPosteriorStrength, exact_output
from rcgdm.simulation.theory import make_world

F64 = torch.float64
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def world():
    return make_world(8, 3, 0.1, 0.0, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_ancestral_step_is_ddpms_own_step(prediction_type):
    scheduler = diffusers.DDPMScheduler(**SD_BETAS, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    levels, after = noise_levels(scheduler), next_levels(scheduler)
    x, output = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)
    for i in (0, 4, 9):  # 9: the last step, onto the data, without noise
        t = scheduler.timesteps[i]
        stock = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(i), return_dict=False)[0]
        mean, std = ancestral_step(output, x, levels[i], after[i], prediction_type)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
        torch.testing.assert_close(mean + std * noise, stock, rtol=1e-6, atol=1e-6)  # the scheduler keeps float32 alphas
        assert (std == 0) == (i == 9)


def test_the_ancestral_step_is_euler_ancestrals_own_step_in_its_sigma_coordinates():
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(10)
    levels, after = noise_levels(scheduler), next_levels(scheduler)
    x_t, output = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        stock = scheduler.step(output, t, x_t * (1 + sigma**2).sqrt(), generator=torch.Generator().manual_seed(i),
                               return_dict=False)[0]  # Euler's latents are x_t / s, s = 1 / sqrt(1 + sigma^2)
        mean, std = ancestral_step(output, x_t, levels[i], after[i], "epsilon")
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
        torch.testing.assert_close((mean + std * noise) * (1 + sigma_next**2).sqrt(), stock.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("prediction_type", "here", "there"), [("flow_prediction", 1.0, 0.7), ("flow_prediction", 0.6, 0.3),
                                                                ("epsilon", 0.2, 0.5), ("v_prediction", 0.0, 0.3)])
def test_with_the_exact_model_the_step_is_the_true_reverse_kernels_mean(world, prediction_type, here, there):
    """Noising x' to x_t by the Markov step x_t = (s / s') x' + noise (whose marginals are the family's), x' and x_t are
    jointly Gaussian: E[x' | x_t] = (s / s') C' C_t^-1 x_t. With the exact model the step's mean is that map, and off the
    data's subspace, where x0 is known to be 0, its variance is the true one, C' - (s / s')^2 C' C_t^-1 C'."""
    here, there = torch.tensor(here, dtype=F64), torch.tensor(there, dtype=F64)
    (s, n), (s2, n2) = (map(float, signal_and_noise(level, prediction_type)) for level in (here, there))
    identity = torch.eye(world.dim, dtype=F64)
    mean, std = ancestral_step(exact_output(world, identity, here, prediction_type), identity, here, there, prediction_type)
    c_there, c_here = world.noised_cov(s2, n2), world.noised_cov(s, n)
    torch.testing.assert_close(mean.T, s / s2 * c_there @ torch.linalg.inv(c_here))  # columns: the images of e_1 ... e_D
    off = identity - world.basis @ world.basis.T
    true_variance = c_there - (s / s2) ** 2 * c_there @ torch.linalg.solve(c_here, c_there)
    torch.testing.assert_close(off @ true_variance @ off, std**2 * off)


def test_systematic_resampling_keeps_each_particle_in_proportion_to_its_weight():
    weights = torch.tensor([[0.05, 0.5, 0.2, 0.25], [0.0, 0.0, 1.0, 0.0]], dtype=F64)
    draws = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    counts = torch.stack([torch.bincount(systematic(weights, u.expand(2)).flatten() + 4 * torch.tensor([0] * 4 + [1] * 4),
                                         minlength=8) for u in draws[:2000]]).double().view(-1, 2, 4)
    expected = 4 * weights
    assert ((counts - expected.floor() >= 0) & (counts - expected.ceil() <= 0)).all()  # floor or ceil of K w, always
    torch.testing.assert_close(counts.mean(0), expected, atol=0.05, rtol=0)


def smc(world, a: float, particles: int, steer: RewardGuidance, label_noise: float, seed: int, count: int = 2000,
        steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` samples of K `particles` each from the exact unconditional model, DDPM `steps`, proposal and twist
    `steer`, final weight N(a; theta^T x0, label_noise^2) -> (samples (count, D), final effective share (count,))."""
    scheduler = diffusers.DDPMScheduler(**SD_BETAS, clip_sample=False)
    scheduler.set_timesteps(steps)
    levels, after = noise_levels(scheduler), next_levels(scheduler)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(count, particles, world.dim, generator=generator, dtype=F64)

    def final(x0: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((a - x0 @ world.theta) / label_noise) ** 2

    samples, trace = sample_particles(lambda x, i: exact_output(world, x, levels[i], "epsilon"), levels, after, "epsilon",
                                      steer, start, Draws(generator, count, torch.device("cpu"), F64), final)
    return samples, trace.ess[:, -1]


def test_particles_correct_a_poor_proposal_and_catch_a_wrong_final_likelihood(world):
    """The proposal guides at a third of the posterior strength: one particle samples too wide a law. 64 particles
    weighted by the exact likelihood sample p(x0 | y = a): reward std within 12% of the exact one. Weighted by a
    likelihood of twice the label noise's variance, their reward std is off by more than 25%."""
    a = 1.0
    weak = ExactPosteriorStrength(world, "epsilon")
    steer = RewardGuidance(ExactLabelMean(world, "epsilon"), a, lambda level: weak(level) / 3)
    exact_std = world.reward_std_given()
    one, _ = smc(world, a, 1, steer, world.noise_std, 0, count=1000)
    right, ess = smc(world, a, 64, steer, world.noise_std, 0, count=1000)
    wrong, _ = smc(world, a, 64, steer, world.noise_std * 2**0.5, 0, count=1000)
    reward_std = {name: float((x @ world.theta).std()) for name, x in (("one", one), ("right", right), ("wrong", wrong))}
    mean, cov = world.conditional(a)
    w2 = {name: fitted_w2(x, mean, cov) for name, x in (("one", one), ("right", right))}
    assert reward_std["one"] > 1.5 * exact_std, reward_std
    assert abs(reward_std["right"] / exact_std - 1) < 0.12, reward_std
    assert abs(reward_std["wrong"] / exact_std - 1) > 0.25, reward_std
    assert w2["right"] < 0.7 * w2["one"], w2
    assert float((right @ world.theta).mean()) == pytest.approx(world.expected_reward(a), abs=0.01)
    assert 0.05 < float(ess.mean()) < 1


def test_with_the_exact_predictor_particles_are_no_further_than_guidance(world):
    """The known-answer setting of tests/test_simulation_theory.py: the exact E[y | x_t] and Var(y | x_t), guided by their
    likelihood. 16 particles with the exact final weight are no further from p(x0 | y = a) than the guided sampler
    alone (one particle, the same 300 steps; at 100 both are 0.06, twice the exact draws', from the steps alone)."""
    a, mean_cov = 2.0, world.conditional(2.0)
    steer = RewardGuidance(ExactLabelLaw(world, "epsilon"), a, 1.0, likelihood=True)
    guided, _ = smc(world, a, 1, steer, world.noise_std, 1, count=3000, steps=300)
    particles, _ = smc(world, a, 16, steer, world.noise_std, 1, count=3000, steps=300)
    assert fitted_w2(particles, *mean_cov) <= fitted_w2(guided, *mean_cov)


@pytest.mark.parametrize(("model", "scheduler", "channels"), [("tiny-random", "ddpm", 4), ("tiny-sdxl-random", "euler_a", 4),
                                                              ("tiny-sd3-random", "flow_euler", 16),
                                                              ("tiny-flux-random", "flow_euler", 16)])
def test_particles_sample_every_family_and_an_image_does_not_depend_on_its_batch(model, scheduler, channels):
    """Two images of 4 particles each, denoised 3 at a time; image 1 again alone: the same latents (within the
    transformers' rounding over batch sizes), each image's effective share recorded per step."""
    from rcgdm.models import load_pipeline
    from rcgdm.predictor import ThreeLayerConvNet
    from rcgdm.sampling.sampler import sample_particle_latents
    from rcgdm.sampling.schedulers import make_scheduler
    from rcgdm.seeds import image_generators

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, "flow_prediction" if scheduler == "flow_euler" else None)
    torch.manual_seed(0)
    steer = RewardGuidance(ThreeLayerConvNet(channels).eval(), 1.0, 50.0)
    both, trace = sample_particle_latents(pipe, "a dog", image_generators(0, range(2)), steer, 4, 3, 5, 3.0, 64, 64, False)
    alone, _ = sample_particle_latents(pipe, "a dog", image_generators(0, [1]), steer, 4, 3, 5, 3.0, 64, 64, False)
    assert both.shape == (2, channels, 8, 8) and torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)  # float32 kernels round by batch size
    assert trace.ess.shape == (2, 6) and ((trace.ess > 0) & (trace.ess <= 1 + 1e-6)).all()


def test_particles_bring_the_predictor_closer_to_the_target_than_guidance_alone():
    """On the tiny random SD, toward 2 std above the unguided mean of mu(x0), at strength 1 / std^2: one particle
    overshoots by several std, 16 particles per image end with mu(x0) less than half as far (their final weight is
    exp(-guidance * 1/2 (target - mu(x0))^2))."""
    from rcgdm.models import load_pipeline
    from rcgdm.predictor import ThreeLayerConvNet
    from rcgdm.sampling.sampler import sample_latents, sample_particle_latents
    from rcgdm.sampling.schedulers import make_scheduler
    from rcgdm.seeds import image_generators

    pipe = load_pipeline("tiny-random")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddpm", pipe.scheduler.config)
    torch.manual_seed(0)
    net = ThreeLayerConvNet(4).eval()
    with torch.no_grad():
        unguided = net(sample_latents(pipe, "", image_generators(0, range(6)), None, 8, 1.0, progress_bar=False))
    target, std = float(unguided.mean() + 2 * unguided.std()), float(unguided.std())
    steer = RewardGuidance(net, target, 1 / std**2)

    def distance(particles: int) -> float:
        latents, _ = sample_particle_latents(pipe, "", image_generators(0, range(6)), steer, particles, 24, 8, 1.0,
                                             progress_bar=False)
        with torch.no_grad():
            return float((net(latents) - target).abs().mean())

    assert distance(16) < 0.5 * distance(1)


def test_the_api_samples_particles_and_refuses_a_deterministic_scheduler(predictor_path):
    from rcgdm.cli import InputError
    from rcgdm.pipeline import RewardDirectedPipeline

    settings = {"target": 2.0, "guidance": 20.0, "num_images": 3, "num_inference_steps": 4, "cfg": 1.0, "batch_size": 2}
    pipe = RewardDirectedPipeline.from_pretrained("tiny-random", predictor_path, scheduler="ddpm")
    assert pipe("", **settings).ess is None
    scored = pipe("", **settings, particles=4)
    assert scored.ess.shape == (3, 5) and torch.isfinite(scored.images).all()
    pipe = RewardDirectedPipeline.from_pretrained("tiny-random", predictor_path, scheduler="ddim")
    with pytest.raises(InputError, match="'DDIMScheduler' steps deterministically, and particles need a stochastic step"):
        pipe("", **settings, particles=4)
    with pytest.raises(InputError, match="batch_mean True with particles"):
        pipe("", **settings, particles=4, batch_mean=True)


def test_inference_reports_the_particles_calls_and_effective_shares(tmp_path, reward_model_path, predictor_path):
    from conftest import inference_args, read_rows, run_script

    args = ["--num_inference_steps", "3", "--scheduler", "ddpm", "--particles", "3", "--target", "1", "--guidance", "0",
            "10", "--num_images", "2", "--bs", "2"]
    assert run_script(*inference_args(tmp_path / "run", reward_model_path, predictor_path, *args)) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    guided = [r for r in rows if float(r["guidance"]) == 10]
    assert {(r["particles"], r["unet_calls"]) for r in guided} == {("3", "9")}
    assert {(r["particles"], r["unet_calls"], r["final_ess"]) for r in rows if float(r["guidance"]) == 0} == {("1", "3", "")}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    combo = next(c for c in summary["combinations"] if c["guidance"] == 10)
    assert combo["particles"] == 3 and len(combo["ess_per_step"]) == 4
    assert combo["final_ess"] == pytest.approx(sum(float(r["final_ess"]) for r in guided) / 2, abs=1e-4)
    assert (tmp_path / "run" / "ess_per_step.png").read_bytes()[:4] == b"\x89PNG"
