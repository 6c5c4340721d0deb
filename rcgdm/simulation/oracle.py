"""The simulation's exact models: the unconditional model output, E[y | x_t] as a predictor (alone, or with
log Var(y | x_t) as its second output), and 1 / Var(y | x_t).

Each is the closed form of rcgdm/simulation/theory.py at the noise level a scheduler sits at (alpha_bar, or sigma for
flow_prediction), so a sampler built from them differs from p(x0 | y = a) only by its discretization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rcgdm.sampling.guidance import signal_and_noise
from rcgdm.simulation.theory import LinearGaussianWorld


def _signal_noise(level: torch.Tensor | float, prediction_type: str) -> tuple[float, float]:
    s, n = signal_and_noise(torch.as_tensor(level, dtype=torch.float64), prediction_type)
    return float(s), float(n)


def exact_output(world: LinearGaussianWorld, x_t: torch.Tensor, level: torch.Tensor | float,
                 prediction_type: str) -> torch.Tensor:
    """The exact unconditional model's output (N, D) of `prediction_type` at points x_t (N, D)."""
    s, n = _signal_noise(level, prediction_type)
    eps = world.eps_mean(x_t, s, n)
    if prediction_type == "epsilon":
        return eps
    x0 = world.x0_mean(x_t, s, n)
    if prediction_type == "v_prediction":
        return s * eps - n * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    return x0


class ExactLabelMean(nn.Module):
    """mu(x_t, level) = E[y | x_t] = b_t^T x_t (N, 1): the predictor that knows the noise level."""

    takes_level = True

    def __init__(self, world: LinearGaussianWorld, prediction_type: str):
        super().__init__()
        self.world, self.prediction_type = world, prediction_type

    def forward(self, x_t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        weights = self.world.label_weights(*_signal_noise(level, self.prediction_type))
        return (x_t.to(torch.float64) @ weights).unsqueeze(1)


class ExactLabelLaw(ExactLabelMean):
    """(E[y | x_t], log Var(y | x_t)) (N, 2): the level-aware predictor with its own variance, exactly (guided with
    RewardGuidance's likelihood=True, its term is the exact conditional score)."""

    predicts_variance = True

    def forward(self, x_t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        mean = super().forward(x_t, level)
        variance = self.world.label_var_given(*_signal_noise(level, self.prediction_type))
        return torch.cat([mean, torch.full_like(mean, math.log(variance))], 1)


class ExactPosteriorStrength:
    """level -> 1 / Var(y | x_t): the strength at which the paper's term is the exact conditional score."""

    def __init__(self, world: LinearGaussianWorld, prediction_type: str):
        self.world, self.prediction_type = world, prediction_type

    def __call__(self, level: torch.Tensor) -> torch.Tensor:
        variance = self.world.label_var_given(*_signal_noise(level, self.prediction_type))
        return torch.as_tensor(1 / variance, dtype=torch.float64)
