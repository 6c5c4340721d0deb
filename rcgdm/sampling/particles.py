"""Particles: twisted sequential Monte Carlo around the paper's guided step, exact as the particles grow in number.

The target is the unguided sampler's own path law times the label's likelihood at its end,
p(x_T, ..., x_0) L(x_0) with L(x_0) = p(y = a | x_0), whose x_0-marginal is p(x_0 | y = a). Guidance alone samples it
approximately; K weighted and resampled particles per image sample it exactly as K grows, whatever the guidance got
wrong on the way, provided L is right.

Twisted SMC (TDS; Wu et al., 2023), with the paper's term as its proposal:
- the twist at step i is the likelihood the term steers by, exp(-E_i(x_i)), E_i being RewardGuidance's energy (the
  strength times 1/2 (a - mu)^2, or -log N(a; mu, v) for a calibrated predictor);
- the proposal is the guided ancestral step q(x' | x_i) = N(m_q, rho^2) (the term shifts the model output), and p the
  unguided one, N(m_p, rho^2);
- each step multiplies a particle's weight by p(x' | x_i) exp(-E_{i+1}(x')) / (q(x' | x_i) exp(-E_i(x_i))); with
  x' = m_q + rho z and D = m_q - m_p, p / q = exp(-D.z / rho - |D|^2 / (2 rho^2));
- the last step lands on the data deterministically (rho = 0), so it is taken unguided (q = p), and the final weight is
  L(x_0) exp(E_last(x_last)): L is the twist at the clean level unless one is passed (the simulation's exact
  p(y = a | x_0), or another predictor's likelihood).
Each image's particles are resampled (systematic) when their effective sample size falls below ess_threshold K, and
one particle per image is kept at the end, drawn by the final weights.

Why TDS rather than FK steering's potentials: its proposal is the guided step, whose correction p / q is known in closed
form, so the guidance moves the particles toward the weight without biasing the target; FK steering proposes unguided
steps and leaves all the steering to resampling.

The ancestral step, for x_t = s x0 + n eps here and s', n' at the next level: the DDPM posterior
N(s' x0 + sqrt(n'^2 - rho^2) eps, rho^2), rho^2 = n'^2 (1 - (s n' / (s' n))^2), x0 and eps the model's estimates. It is
DDPMScheduler's step (variance "fixed_small") and EulerAncestralDiscreteScheduler's (in sigma = n / s) for diffusion
models; for flow models (s = 1 - sigma, n = sigma) the same posterior of the Markov noising with the flow's marginals,
a stochastic sampler with the flow's marginals.

Randomness comes from each image's own generator (`Draws`): an image's particles, resampling and final pick do not
depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcgdm.sampling.guidance import RewardGuidance, as_eps, as_x0, signal_and_noise

MAX_PARTICLES = 4096  # per image: a bound on a count typed by hand
ESS_THRESHOLD = 0.5  # resample an image's particles when their effective sample size falls below this share of K
Denoise = Callable[[torch.Tensor, int], torch.Tensor]  # (particles (N, ...), step index) -> the unguided model output


@dataclass(frozen=True)
class Trace:
    """What each image's particles did, per step and after the final weight: the effective sample size before
    resampling as a share of K (B, steps + 1), and whether they were resampled (B, steps + 1; always after the last)."""

    particles: int
    ess: torch.Tensor
    resampled: torch.Tensor


class Draws:
    """The randomness of a batch of images: each image's from its own generator (a list), or all from one."""

    def __init__(self, generators: list[torch.Generator] | torch.Generator, count: int, device: torch.device,
                 dtype: torch.dtype):
        self.generators, self.count, self.device, self.dtype = generators, count, device, dtype

    def _draw(self, sample: Callable[[tuple, torch.Generator], torch.Tensor], shape: tuple) -> torch.Tensor:
        if isinstance(self.generators, torch.Generator):
            return sample((self.count, *shape), self.generators)
        return torch.stack([sample(shape, generator) for generator in self.generators])

    def normal(self, shape: tuple) -> torch.Tensor:
        """N(0, I) draws (count, *shape) in the batch's dtype, on its device."""
        return self._draw(lambda size, g: torch.randn(size, generator=g, dtype=self.dtype), shape).to(self.device)

    def uniform(self) -> torch.Tensor:
        """One U(0, 1) draw per image (count,), float64, on the batch's device."""
        return self._draw(lambda size, g: torch.rand(size, generator=g, dtype=torch.float64), ()).to(self.device)


def ancestral_step(output: torch.Tensor, x_t: torch.Tensor, here: torch.Tensor, there: torch.Tensor,
                   prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ancestral step's mean (N, ...) and std (a 0-dim tensor) from x_t at level `here` to level `there`, for a model
    output of `prediction_type` (module docstring); in float32, or float64 for float64 x_t."""
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    (s, n), (s2, n2) = (signal_and_noise(level.to(dtype), prediction_type) for level in (here, there))
    x_t, output = x_t.to(dtype), output.to(dtype)
    eps, x0 = as_eps(output, x_t, s, n, prediction_type), as_x0(output, x_t, s, n, prediction_type)
    variance = (n2**2 * (1 - (s * n2 / (s2 * n)) ** 2)).clamp(min=0)
    return s2 * x0 + (n2**2 - variance).clamp(min=0).sqrt() * eps, variance.sqrt()


def systematic(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Systematic resampling: per row of normalised weights (B, K), K particle indices (B, K) drawn with one U(0, 1)
    number per row (B,)."""
    k = weights.shape[1]
    positions = (uniform[:, None] + torch.arange(k, device=weights.device, dtype=weights.dtype)) / k
    return torch.searchsorted(weights.cumsum(1).contiguous(), positions).clamp(max=k - 1)


def effective_size(weights: torch.Tensor) -> torch.Tensor:
    """1 / sum w^2 per row of normalised weights (B, K) -> (B,)."""
    return 1 / weights.pow(2).sum(1)


@torch.no_grad()
def sample_particles(denoise: Denoise, levels: torch.Tensor, next_levels: torch.Tensor, prediction_type: str,
                     steer: RewardGuidance, start: torch.Tensor, draws: Draws,
                     final: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ess_threshold: float = ESS_THRESHOLD) -> tuple[torch.Tensor, Trace]:
    """One sample per image from K particles each: start (B, K, ...) at levels[0], stepped through `levels` (steps,) to
    `next_levels` (steps,; the last one clean), guided by `steer` -> (samples (B, ...) in start's dtype, Trace).
    `final` maps samples (N, ...) to log L (N,), the final weight (default: the twist at the clean level). An image whose
    weights stop being finite gets NaN."""
    batch, k = start.shape[:2]
    x, dims = start.flatten(0, 1), tuple(range(1, start.dim() - 1))
    rows = torch.arange(batch, device=x.device)[:, None]
    log_w = torch.zeros(batch, k, dtype=torch.float64, device=x.device)
    ess, resampled, energy_before = [], [], None
    steps = len(levels)
    for i in range(steps):
        output = denoise(x, i)
        shifted, energy = steer.guided(output, x, levels[i], prediction_type)
        energy = energy.double().view(batch, k)
        log_w = log_w - energy if energy_before is None else log_w + energy_before - energy
        weights = torch.softmax(log_w, 1)
        size = effective_size(weights) / k
        again = size < ess_threshold
        ess.append(size), resampled.append(again)
        picked = torch.where(again[:, None], systematic(weights, draws.uniform()),
                             torch.arange(k, device=x.device).expand(batch, k))
        x, output, shifted, energy = (v.view(batch, k, *v.shape[1:])[rows, picked].flatten(0, 1)
                                      for v in (x, output, shifted, energy.view(-1)))
        energy = energy.view(batch, k)
        log_w = torch.where(again[:, None], torch.zeros_like(log_w), log_w)
        if i == steps - 1:  # onto the data, deterministically: unguided, so that q = p
            x = ancestral_step(output, x, levels[i], next_levels[i], prediction_type)[0].to(start.dtype)
        else:
            mean_q, rho = ancestral_step(shifted, x, levels[i], next_levels[i], prediction_type)
            mean_p, _ = ancestral_step(output, x, levels[i], next_levels[i], prediction_type)
            z = draws.normal(tuple(start.shape[1:])).flatten(0, 1).to(mean_q.dtype)
            gap = mean_q - mean_p
            log_w = log_w - ((gap * z).sum(dims) / rho + gap.pow(2).sum(dims) / (2 * rho**2)).double().view(batch, k)
            x = (mean_q + rho * z).to(start.dtype)
        energy_before = energy
    log_l = -steer.energy(x, next_levels[-1]) if final is None else final(x)
    log_w = log_w + energy_before + log_l.double().view(batch, k)
    weights = torch.softmax(log_w, 1)
    ess.append(effective_size(weights) / k), resampled.append(torch.ones_like(again))
    pick = torch.searchsorted(weights.cumsum(1).contiguous(), draws.uniform()[:, None]).clamp(max=k - 1)
    samples = x.view(batch, k, *x.shape[1:])[rows, pick][:, 0]
    broken = ~torch.isfinite(log_w).all(1)
    samples[broken] = float("nan")
    return samples, Trace(k, torch.stack(ess, 1).float().cpu(), torch.stack(resampled, 1).cpu())
