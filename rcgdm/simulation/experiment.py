"""The paper's simulation, run: one world, the learned models, five samplers per target, and their measures.

Samplers (each draws `num_samples` points at target a):
- "exact": draws from p(x0 | y = a), the answer;
- "fixed": the repository's method, the exact unconditional eps plus RewardGuidance's term with the learned
  level-blind predictor at a fixed strength, stepped by a diffusers DDIM scheduler;
- "posterior": the same at the posterior strength 1 / sigma_t^2 read off the predictor's validation errors;
- "posterior_calibrated": the calibrated predictor (told the level, predicting its own variance) guiding by its own
  Gaussian likelihood, grad log N(a; mu(x_t, t), v(x_t, t));
- "conditional": the paper's meta-algorithm, the conditional model trained on pseudo-labels, sampled at y = a.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from tqdm import tqdm

from rcgdm.guidance import RewardGuidance
from rcgdm.posterior import PosteriorStrength
from rcgdm.simulation import measures
from rcgdm.simulation.learned import ConditionalEps, LearnedPredictor, pseudo_labels, train_conditional, train_predictor
from rcgdm.simulation.oracle import exact_output
from rcgdm.simulation.sampling import sample_points
from rcgdm.simulation.theory import LinearGaussianWorld, make_world

CALIBRATION_POINTS = 1000  # fresh labelled points that measure the calibrated predictor at every level
SAMPLERS = ("exact", "fixed", "posterior", "posterior_calibrated", "conditional")


@dataclass(frozen=True)
class Settings:
    dim: int
    sub_dim: int
    noise_std: float
    off_subspace: float
    num_labelled: int
    num_unlabelled: int
    held_out: float
    targets: tuple[float, ...]
    num_samples: int
    num_inference_steps: int
    fixed_guidance: float
    predictor_epochs: int
    calibrated_epochs: int
    conditional_steps: int
    seed: int


def memory_needed(s: Settings) -> tuple[int, str]:
    """A lower bound on the bytes a run holds at once (float64): the unlabelled points (with the pseudo-labelling's
    copies), one sampler's points (with its step's intermediates) and the D x D covariances of the W2 measure ->
    (bytes, how they add up)."""
    points = 8 * s.dim * (3 * s.num_unlabelled + 4 * s.num_samples)
    covariances = 8 * 8 * s.dim**2
    return points + covariances, f"{points / 1e9:.3g} GB of points, {covariances / 1e9:.3g} GB of covariances"


def scheduler(steps: int):
    """DDIM on SD's noise schedule, without the clipping of x0 that DDIM's defaults apply (fit for images in [-1, 1])."""
    made = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    made.set_timesteps(steps)
    return made


@dataclass(frozen=True)
class Learned:
    """A world, its labelled points and the models learned from them (`learn`)."""

    world: LinearGaussianWorld
    x: torch.Tensor  # (N, D) labelled points
    y: torch.Tensor  # (N,) their labels
    predictor: LearnedPredictor | None  # the paper's level-blind predictor, on the labelled points
    calibrated: LearnedPredictor | None  # the calibrated one, on the pseudo-labelled points
    conditional: ConditionalEps | None  # the paper's conditional model, on the pseudo-labelled points


def learn(s: Settings, generator: torch.Generator, samplers: tuple[str, ...] = SAMPLERS) -> Learned:
    """The world of `s` and what each of `samplers` needs learned (the others' models are not trained: None)."""
    world = make_world(s.dim, s.sub_dim, s.noise_std, s.off_subspace, generator)
    x, y = world.sample_labelled(s.num_labelled, generator)
    unlabelled = world.sample_data(s.num_unlabelled, generator)
    count = round(s.num_labelled * (1 - s.held_out))
    sampler_schedule = scheduler(s.num_inference_steps)
    predictor = None
    if {"fixed", "posterior"} & set(samplers):
        predictor = train_predictor((x[:count], y[:count]), (x[count:], y[count:]), sampler_schedule, s.predictor_epochs,
                                    generator)
    labels = pseudo_labels(x, y, unlabelled, generator)
    calibrated = None
    if "posterior_calibrated" in samplers:
        fresh = world.sample_labelled(CALIBRATION_POINTS, generator)  # the pseudo-labeller saw every labelled point
        calibrated = train_predictor((unlabelled, labels), fresh, sampler_schedule, s.calibrated_epochs, generator,
                                     calibrated=True)
    conditional = None
    if "conditional" in samplers:
        conditional = train_conditional(unlabelled, labels, scheduler(1000), s.conditional_steps, generator)
    return Learned(world, x, y, predictor, calibrated, conditional)


def draw(learned: Learned, s: Settings, name: str, a: float, generator: torch.Generator) -> torch.Tensor:
    """`s.num_samples` points (N, D) of sampler `name` at target a."""
    world = learned.world
    if name == "exact":
        return world.sample_conditional(a, s.num_samples, generator)
    if name == "conditional":
        return sample_points(lambda p, t, level: learned.conditional(p, a, level), scheduler(s.num_inference_steps),
                             "epsilon", s.num_samples, s.dim, s.num_inference_steps, generator)
    if name == "posterior_calibrated":
        steer = RewardGuidance(learned.calibrated.net, a, 1.0, likelihood=True)
    else:
        strength = s.fixed_guidance if name == "fixed" else PosteriorStrength.from_curve(learned.predictor.curve)
        steer = RewardGuidance(learned.predictor.net, a, strength)
    return sample_points(lambda points, t, level: exact_output(world, points, level, "epsilon"),
                         scheduler(s.num_inference_steps), "epsilon", s.num_samples, s.dim, s.num_inference_steps,
                         generator, steer)


def run(settings: Settings) -> dict:
    """Everything the summary holds: the world's facts, the learned models' facts and, per target and sampler, the
    measures (rcgdm/simulation/measures.py)."""
    s = settings
    generator = torch.Generator().manual_seed(s.seed)
    learned = learn(s, generator)
    world, x, y, predictor, calibrated, conditional = (learned.world, learned.x, learned.y, learned.predictor,
                                                       learned.calibrated, learned.conditional)
    rows = []
    for a in tqdm(s.targets, desc="targets"):
        for name in SAMPLERS:
            rows.append({"target": a, "sampler": name, **measure(world, a, draw(learned, s, name, a, generator))})
    marginal_y = pseudo_labels(x, y, world.sample_data(s.num_samples, generator), generator)
    marginal = sample_points(lambda p, t, level: conditional(p, marginal_y, level), scheduler(s.num_inference_steps),
                             "epsilon", s.num_samples, s.dim, s.num_inference_steps, generator)
    return {"world": world_facts(world), "labels": {"min": y.min().item(), "max": y.max().item(), "std": y.std().item()},
            "posterior_curve": predictor.curve, "calibration": calibrated.calibration, "rows": rows,
            "conditional_model": {"principal_angle_deg": measures.principal_angle(marginal, world.basis),
                                  "off_subspace": measures.off_subspace(marginal, world.basis)}}


MEASURES = ("reward_mean", "reward_se", "reward_std", "gap_to_target", "exact_reward", "exact_reward_std", "gap_to_exact",
            "off_subspace", "w2")


def measure(world: LinearGaussianWorld, a: float, points: torch.Tensor) -> dict:
    """The measures of `points` (N, D) at target a; a sampler that diverged (NaN, inf, or values too large for the
    covariance) is recorded as such, its measures None: NaN is never a result."""
    diverged = {"diverged": True, **dict.fromkeys(MEASURES)}
    if not torch.isfinite(points).all():
        return diverged
    mean, cov = world.conditional(a)
    try:
        w2 = measures.fitted_w2(points, mean, cov)
    except torch.linalg.LinAlgError:
        return diverged
    reward, error = measures.mean_reward(points, world.theta)
    expected = world.expected_reward(a)
    return {"diverged": False, "reward_mean": reward, "reward_se": error, "reward_std": float((points @ world.theta).std()),
            "gap_to_target": reward - a, "exact_reward": expected, "exact_reward_std": world.reward_std_given(),
            "gap_to_exact": reward - expected, "off_subspace": measures.off_subspace(points, world.basis), "w2": w2}


def world_facts(world: LinearGaussianWorld) -> dict:
    return {"dim": world.dim, "sub_dim": world.basis.shape[1], "noise_std": world.noise_std,
            "reward_var": world.reward_var, "label_var": world.label_var,
            "theta_off_subspace": float((world.theta - world.basis @ (world.basis.T @ world.theta)).norm() ** 2)}
