"""The particle sampler (rcgdm/particles.py) against known answers: its ancestral step is diffusers' DDPM and Euler
ancestral steps, and for flow models keeps the flow's marginals exactly; systematic resampling; and in the simulation's
Gaussian world its law against p(x0 | y = a): exact as the particles grow however poor the proposal, no worse than
guidance with the exact predictor, and off when the final likelihood is wrong."""

from __future__ import annotations

import diffusers
import pytest
import torch

from rcgdm.guidance import RewardGuidance, signal_and_noise
from rcgdm.particles import Draws, ancestral_step, sample_particles, systematic
from rcgdm.schedulers import next_levels, noise_levels
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
