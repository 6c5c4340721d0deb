"""The paper's simulation, run: one world, the learned models, five samplers per target, and their measures.

Samplers (each draws `num_samples` points at target a):
- "exact": draws from p(x0 | y = a), the answer;
- "fixed": the repository's method, the exact unconditional eps plus RewardGuidance's term with the learned
  level-blind predictor at a fixed strength, stepped by a diffusers DDIM scheduler;
- "posterior": the same at the posterior strength 1 / sigma_t^2 read off the predictor's validation errors;
- "posterior_calibrated": the calibrated predictor (told the level, predicting its own variance) guiding by its own
  Gaussian likelihood, grad log N(a; mu(x_t, t), v(x_t, t));
- "conditional": the paper's meta-algorithm, the conditional model trained on pseudo-labels, sampled at y = a.

Particles (rcgdm/sampling/particles.py), at `particle_targets` only (K particles cost K times a sampler's work), stepped by
DDPM's ancestral step over `particle_steps` steps: its own discretisation must be small, and the ancestral step's is
larger than DDIM's at the same count (with the exact model and likelihood, 50 steps leave W2 1.4x the exact draws' and
100 steps 1.1-1.2x):
- "smc_K": K particles per point, the paper's level-blind predictor at its posterior strength as the proposal and the
  twist, the exact p(y = a | x0) as the final weight: exact as K grows, however poor the proposal;
- "smc_calibrated_16": 16 particles, the calibrated predictor's likelihood as the proposal, the twist and, at its clean
  level, the final weight: learned end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from tqdm import tqdm

from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.particles import Draws, Trace, sample_particles
from rcgdm.sampling.posterior import PosteriorStrength
from rcgdm.sampling.schedulers import next_levels, noise_levels
from rcgdm.simulation import measures
from rcgdm.simulation.learned import ConditionalEps, LearnedPredictor, pseudo_labels, train_conditional, train_predictor
from rcgdm.simulation.oracle import exact_output
from rcgdm.simulation.sampling import sample_points
from rcgdm.simulation.theory import LinearGaussianWorld, make_world

CALIBRATION_POINTS = 1000  # fresh labelled points that measure the calibrated predictor at every level
SAMPLERS = ("exact", "fixed", "posterior", "posterior_calibrated", "conditional")
CALIBRATED_PARTICLES = 16  # the particles of the row smc_calibrated_16


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
    particles: tuple[int, ...] = ()  # K of the rows smc_K
    particle_targets: tuple[float, ...] | str = "range"  # "range": the targets inside the labels' range
    particle_steps: int = 100


def memory_needed(s: Settings) -> tuple[int, str]:
    """A lower bound on the bytes a run holds at once (float64): the unlabelled points (with the pseudo-labelling's
    copies), one sampler's points (with its step's intermediates) and the D x D covariances of the W2 measure ->
    (bytes, how they add up)."""
    points = 8 * s.dim * (3 * s.num_unlabelled + 4 * s.num_samples * max((*s.particles, CALIBRATED_PARTICLES)))
    covariances = 8 * 8 * s.dim**2
    return points + covariances, f"{points / 1e9:.3g} GB of points, {covariances / 1e9:.3g} GB of covariances"


def scheduler(steps: int, kind: str = "DDIMScheduler"):
    """DDIM (or another diffusers scheduler `kind`) on SD's noise schedule, without the clipping of x0 that their
    defaults apply (fit for images in [-1, 1])."""
    made = getattr(diffusers, kind)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
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


def draw_particles(learned: Learned, s: Settings, a: float, k: int, generator: torch.Generator,
                   calibrated: bool = False) -> tuple[torch.Tensor, Trace]:
    """`s.num_samples` points (N, D) of the row smc_K at target a (calibrated: smc_calibrated_K), and the particles'
    Trace: K particles per point from the exact unconditional eps, DDPM's ancestral step (module docstring)."""
    world, schedule = learned.world, scheduler(s.particle_steps, "DDPMScheduler")
    levels, after = noise_levels(schedule), next_levels(schedule)
    if calibrated:
        steer, final = RewardGuidance(learned.calibrated.net, a, 1.0, likelihood=True), None
    else:
        strength = PosteriorStrength.from_curve(learned.predictor.curve)
        steer, final = RewardGuidance(learned.predictor.net, a, strength), lambda x0: world.label_log_likelihood(x0, a)
    start = torch.randn(s.num_samples, k, s.dim, generator=generator, dtype=torch.float64)
    return sample_particles(lambda points, i: exact_output(world, points, levels[i], "epsilon"), levels, after, "epsilon",
                            steer, start, Draws(generator, s.num_samples, torch.device("cpu"), torch.float64), final)


def particle_rows(learned: Learned, s: Settings, generator: torch.Generator) -> list[dict]:
    """The rows smc_K (K in s.particles) and smc_calibrated_16 at each of s.particle_targets (or, for "range", each
    target inside the labelled points' range), with the share of effective particles left after the final weight."""
    rows, targets = [], s.particle_targets
    if targets == "range":
        targets = [a for a in s.targets if float(learned.y.min()) <= a <= float(learned.y.max())]
    for a in tqdm(targets, desc="particles"):
        kinds = [(f"smc_{k}", k, False) for k in s.particles]
        for name, k, calibrated in [*kinds, (f"smc_calibrated_{CALIBRATED_PARTICLES}", CALIBRATED_PARTICLES, True)]:
            points, trace = draw_particles(learned, s, a, k, generator, calibrated)
            rows.append({"target": a, "sampler": name, "particles": k, "final_ess": float(trace.ess[:, -1].mean()),
                         **measure(learned.world, a, points)})
    return rows


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
    rows += particle_rows(learned, s, generator)
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
