"""Sampling the simulation with a diffusers scheduler: the unconditional model plus the project's guidance term.

The loop is the one rcgdm/sampling/sampler.py runs on images, on points (N, D): scale the input as the scheduler does, ask
the model, add RewardGuidance's term at the level the scheduler sits at (rcgdm/sampling/schedulers.py), step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.schedulers import is_flow, noise_levels

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (N, D), t, level) -> output (N, D)


@torch.no_grad()
def sample_points(model: Model, scheduler, prediction_type: str, count: int, dim: int, steps: int,
                  generator: torch.Generator, steer: RewardGuidance | None = None,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """`count` points (count, D) in float64, denoised from N(0, I) over `steps` steps of `scheduler`; from `start`
    (count, D) in place of the N(0, I) draws when given (a deterministic sampler is then a function of it)."""
    scheduler.set_timesteps(steps)
    levels = noise_levels(scheduler)
    start_std = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow schedulers start from N(0, I)
    if start is None:
        start = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    x = start.to(torch.float64) * start_std
    flow = is_flow(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        x_t = x if flow else scheduler.scale_model_input(x, t)
        output = model(x_t, t, levels[i])
        if steer is not None:
            output = steer.apply(output, x_t, levels[i], prediction_type)
        x = scheduler.step(output, t, x, return_dict=False)[0]
    return x
