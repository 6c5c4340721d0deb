"""The posterior strength: the guidance at which the paper's term samples p(x | y = a), read off the predictor's errors.

With the paper's likelihood y | x_t ~ N(mu(x_t), sigma_t^2), grad_x log p_t(y | x_t) = -(1 / sigma_t^2) grad_x
1/2 ||y - mu(x_t)||^2: the strength is 1 / sigma_t^2, where sigma_t^2 = Var(y | x_t) is the predictor's squared error
at that noise level (at t = 0 with the paper's label noise 0.1 it is 100, the paper's guidance). train.py measures it
on its validation latents, each noised at one level, and records the curve in the checkpoint (`fit_curve`): the
errors in equal-count bins by level, made monotone in the noise (a noisier input cannot be predicted better; pooled
adjacent violators) and interpolated linearly between the bins' mean levels, flat beyond them. The simulation checks it
against the exact Var(y | x_t) (rcgdm/simulation).

Levels are the predictor's family's: alpha_bar for diffusion models (more noise: lower), sigma for flow matching
(more noise: higher).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from rcgdm.cli import FLOAT32_MAX, finite32

POSTERIOR = "posterior"
MAX_BINS = 24
MIN_PER_BIN = 8


def fit_curve(levels: torch.Tensor, squared_errors: torch.Tensor, flow: bool) -> dict:
    """{"levels": [...], "variances": [...]} (ascending levels) from each validation input's level and squared error
    (N,); at least MIN_PER_BIN inputs per bin and more than one bin when N allows, at most MAX_BINS."""
    if len(levels) != len(squared_errors) or len(levels) < 2:
        raise ValueError(f"{len(levels)} levels and {len(squared_errors)} errors; expected two or more of each")
    order = torch.argsort(levels.double())
    levels, errors = levels.double()[order], squared_errors.double()[order]
    bins = max(2, min(MAX_BINS, len(levels) // MIN_PER_BIN))
    pairs = zip(levels.chunk(bins), errors.chunk(bins), strict=True)
    chunks = [(lv.mean().item(), er.mean().item(), len(er)) for lv, er in pairs]
    by_noise = chunks if flow else chunks[::-1]  # from the least noisy bin to the noisiest
    smoothed = _nondecreasing([v for _, v, _ in by_noise], [w for _, _, w in by_noise])
    if not flow:
        smoothed = smoothed[::-1]
    return {"levels": [lv for lv, _, _ in chunks], "variances": smoothed}


def calibration_by_level(levels: torch.Tensor, errors: torch.Tensor, variances: torch.Tensor | None,
                         bins: int = 5) -> dict:
    """Held-out squared errors (N,) and the variances a calibrated predictor predicted for them (N,) or None, at
    `levels` (N,), averaged in `bins` equal-count bins of level (ascending) -> {"levels", "squared_errors",
    "predicted_variances", "ratio" (predicted / measured; these two None without variances)}."""
    chunks = [chunk for chunk in torch.argsort(levels.double()).chunk(bins) if len(chunk)]

    def by_bin(values: torch.Tensor) -> list[float]:
        return [float(values[chunk].double().mean()) for chunk in chunks]

    measured = by_bin(errors)
    predicted = None if variances is None else by_bin(variances)
    ratio = None if predicted is None else [p / max(e, 1e-30) for p, e in zip(predicted, measured, strict=True)]
    return {"levels": by_bin(levels), "squared_errors": measured, "predicted_variances": predicted, "ratio": ratio}


def _nondecreasing(values: list[float], weights: list[int]) -> list[float]:
    """The weighted least-squares non-decreasing fit to `values` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, c2), (m1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(count)]


def posterior_fields(curve: dict | None) -> dict:
    """A curve as the predictor checkpoint's flat metadata fields (None: no validation measured one)."""
    return {"posterior_levels": None if curve is None else curve["levels"],
            "posterior_variances": None if curve is None else curve["variances"]}


def curve_problem(levels: object, variances: object) -> str | None:
    """What is wrong with a recorded curve, or None: ascending levels in [0, 1] and finite variances > 0, as many."""
    numbers = all(isinstance(v, list) and 2 <= len(v) <= MAX_BINS and all(type(x) in (int, float) for x in v)
                  for v in (levels, variances))
    if not numbers or len(levels) != len(variances):
        return f"lists of 2 to {MAX_BINS} numbers, as many levels as variances"
    if not all(0 <= a <= b <= 1 for a, b in itertools.pairwise(levels)):
        return "ascending levels in [0, 1]"
    if not all(finite32(v) and v >= 1 / FLOAT32_MAX for v in variances):  # 1 / v, the strength, is float32 too
        return f"variances from {1 / FLOAT32_MAX:.3g} to {FLOAT32_MAX:.3g} (float32, as is their inverse)"
    return None


@dataclass(frozen=True)
class PosteriorStrength:
    """level -> 1 / sigma^2(level), sigma^2 interpolated on a recorded curve. Called at each sampling step with the
    level as a 0-dim tensor on the sampling device; computed there (no host sync)."""

    levels: tuple[float, ...]
    variances: tuple[float, ...]

    @classmethod
    def from_curve(cls, curve: dict) -> PosteriorStrength:
        return cls(tuple(curve["levels"]), tuple(curve["variances"]))

    def variance(self, level: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if level.dtype == torch.float64 else torch.float32
        known, values = _on_device(self.levels, self.variances, level.device, dtype)
        x = level.to(dtype).clamp(known[0], known[-1])
        right = torch.searchsorted(known, x.reshape(1)).clamp(1, len(known) - 1)[0]
        left = right - 1
        share = (x - known[left]) / (known[right] - known[left]).clamp(min=torch.finfo(dtype).tiny)
        return values[left] + share.clamp(0, 1) * (values[right] - values[left])

    def __call__(self, level: torch.Tensor) -> torch.Tensor:
        return 1 / self.variance(level)


@functools.lru_cache(maxsize=8)
def _on_device(levels: tuple[float, ...], variances: tuple[float, ...], device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The curve as tensors on `device`, copied there once (a copy at every step would wait for the GPU each time)."""
    return (torch.tensor(levels, dtype=dtype, device=device), torch.tensor(variances, dtype=dtype, device=device))
