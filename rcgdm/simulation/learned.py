"""The simulation's learned models: the repository's predictor, and the paper's pseudo-labeller and conditional model.

- The predictor mu(x_t) learns the labels from noised points as train.py learns them from noised latents (the same
  `train_epoch`: a timestep drawn from the sampler's schedule per point, fresh noise, MSE, Adam); it is not told the
  level. Its posterior-strength curve comes from its squared errors on held-out labelled points (rcgdm/posterior.py).
- The paper's meta-algorithm: a reward model fitted on the clean labelled points (least squares) pseudo-labels the
  unlabelled ones, y = f(x) + N(0, s^2) with s its residual std, and a conditional network eps(x_t, y, level) is
  trained on them by denoising score matching, then sampled at y = a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rcgdm.posterior import fit_curve
from rcgdm.training import noise_level, noised, train_epoch


def mlp(inputs: int, outputs: int, width: int, generator: torch.Generator) -> nn.Sequential:
    """A 2-hidden-layer SiLU network in float64, initialised from `generator` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                             nn.Linear(width, outputs)).double()


@dataclass(frozen=True)
class LearnedPredictor:
    net: nn.Module  # (N, D) -> (N, 1), float64
    curve: dict  # the posterior-strength curve, rcgdm/posterior.py


def train_predictor(x: torch.Tensor, y: torch.Tensor, scheduler, epochs: int, held_out: float,
                    generator: torch.Generator, width: int = 128) -> LearnedPredictor:
    """mu on labelled points x (N, D), labels y (N,); `held_out` of them measure the curve at every level."""
    count = round(len(x) * (1 - held_out))
    pool = torch.unique(scheduler.timesteps)
    net = mlp(x.shape[1], 1, width, generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="predictor", leave=False):
        train_epoch(net, optimizer, scheduler, x[:count], y[:count, None], pool, generator, batch_size=32, progress=False)
    net.eval()
    x_val, y_val = x[count:].repeat(len(pool), 1), y[count:].repeat(len(pool))
    timesteps = pool.repeat_interleave(len(x) - count)
    noisy = noised(scheduler, x_val, torch.randn(x_val.shape, generator=generator, dtype=x_val.dtype), timesteps)
    with torch.no_grad():
        errors = (net(noisy).squeeze(1) - y_val) ** 2
    return LearnedPredictor(net, fit_curve(noise_level(scheduler, timesteps), errors, flow=False))


def pseudo_labels(x: torch.Tensor, y: torch.Tensor, unlabelled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels (M,) for `unlabelled` (M, D) from a least-squares fit on (x (N, D), y (N,)), with its residual noise."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weights = torch.linalg.lstsq(design, y[:, None]).solution
    residual = (y[:, None] - design @ weights).std()
    fitted = torch.cat([unlabelled, torch.ones(len(unlabelled), 1, dtype=x.dtype)], 1) @ weights
    return (fitted + residual * torch.randn(fitted.shape, generator=generator, dtype=x.dtype)).squeeze(1)


class ConditionalEps(nn.Module):
    """eps(x_t, y, level) (N, D): the paper's conditional diffusion model, told the label and sqrt(a), sqrt(1 - a)."""

    def __init__(self, dim: int, generator: torch.Generator, width: int = 256):
        super().__init__()
        self.net = mlp(dim + 3, dim, width, generator)

    def forward(self, x_t: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        level = level.to(x_t.dtype).reshape(-1, 1).expand(len(x_t), 1)
        y = torch.as_tensor(y, dtype=x_t.dtype).reshape(-1, 1).expand(len(x_t), 1)
        return self.net(torch.cat([x_t, y, level.sqrt(), (1 - level).sqrt()], 1))


def train_conditional(x: torch.Tensor, y: torch.Tensor, scheduler, steps: int, generator: torch.Generator,
                      batch_size: int = 256) -> ConditionalEps:
    """Conditional denoising score matching on (x (M, D), y (M,)) at the training schedule's timesteps."""
    net = ConditionalEps(x.shape[1], generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps_total = scheduler.config.num_train_timesteps
    for _ in tqdm(range(steps), desc="conditional model", leave=False):
        picks = torch.randint(len(x), (batch_size,), generator=generator)
        timesteps = torch.randint(steps_total, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, x.shape[1], generator=generator, dtype=x.dtype)
        noisy = noised(scheduler, x[picks], noise, timesteps)
        loss = (net(noisy, y[picks], noise_level(scheduler, timesteps)) - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()

