"""The simulation's learned models: the repository's predictor, and the paper's pseudo-labeller and conditional model.

- The predictor mu(x_t) learns the labels from noised points as train.py learns them from noised latents (the same
  `train_epoch`: a timestep drawn from the sampler's schedule per point, fresh noise, MSE, Adam); it is not told the
  level. Its posterior-strength curve comes from its squared errors on held-out labelled points (rcgdm/sampling/posterior.py).
- The paper's meta-algorithm: a reward model fitted on the clean labelled points (least squares) pseudo-labels the
  unlabelled ones, y = f(x) + N(0, s^2) with s its residual std, and a conditional network (x_t, y, level) -> eps is
  trained on them by denoising, then sampled at y = a.
- The calibrated predictor (mu(x_t, t) and log Var(y | x_t)) learns from the same pseudo-labelled points, by the
  same `train_epoch` with its Gaussian likelihood (rcgdm.training.predictor_loss).

Both pseudo-labelled models learn from the 20,000 unlabelled points what 150 labelled ones cannot tell: how the data
spread, which E[y | x_t] and E[x0 | x_t, y] depend on at every noisy level (trained on the labelled points alone, the
calibrated predictor's W2 to p(x | y = a) was 1.3-3x the exact draws', against 1.0-1.2x on pseudo-labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rcgdm.sampling.posterior import calibration_by_level, fit_curve
from rcgdm.training import noise_level, noised, train_epoch, validation_outputs


def mlp(inputs: int, outputs: int, width: int, generator: torch.Generator) -> nn.Sequential:
    """A 2-hidden-layer SiLU network in float64, initialised from `generator` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                             nn.Linear(width, outputs)).double()


class CalibratedLinear(nn.Module):
    """The simulation's calibrated predictor, (N, 2): mu(x_t, level) = w(level)^T x_t + c(level) and log Var(y | x_t) =
    h(level), with w, c and h one small network of sqrt(a) and sqrt(1 - a). Linear in x_t with weights that follow the
    level: the class the exact E[y | x_t] = b_t^T x_t belongs to (rcgdm/predictor.py's CalibratedConvNet is its
    counterpart on latents)."""

    takes_level = True
    predicts_variance = True

    def __init__(self, dim: int, generator: torch.Generator, width: int = 64):
        super().__init__()
        self.dim = dim
        self.net = mlp(2, dim + 2, width, generator)

    def forward(self, x_t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        level = torch.as_tensor(level, dtype=x_t.dtype).reshape(-1, 1)
        coefficients = self.net(torch.cat([level.sqrt(), (1 - level).sqrt()], 1)).expand(len(x_t), -1)  # (N, D + 2)
        mean = (coefficients[:, : self.dim] * x_t).sum(1, keepdim=True) + coefficients[:, self.dim : self.dim + 1]
        return torch.cat([mean, coefficients[:, self.dim + 1 :]], 1)


@dataclass(frozen=True)
class LearnedPredictor:
    net: nn.Module  # (N, D) -> (N, 1), float64; or CalibratedLinear
    curve: dict  # the posterior-strength curve from held-out labelled points, rcgdm/sampling/posterior.py
    calibration: dict  # by level, on held-out labelled points: rcgdm.sampling.posterior.calibration_by_level


def train_predictor(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor], scheduler,
                    epochs: int, generator: torch.Generator, calibrated: bool = False) -> LearnedPredictor:
    """mu learned on points (N, D) and their labels (N,) (`train`), measured on labelled points noised at every level
    of the schedule (`held_out`). The paper's level-blind MLP trains in batches of 32; the level-aware
    CalibratedLinear (calibrated=True), with its variance, in batches of 500."""
    (x, y), pool = train, torch.unique(scheduler.timesteps)
    net = CalibratedLinear(x.shape[1], generator) if calibrated else mlp(x.shape[1], 1, 128, generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3 if calibrated else 1e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if calibrated else None
    for _ in tqdm(range(epochs), desc="calibrated predictor" if calibrated else "predictor", leave=False):
        train_epoch(net, optimizer, scheduler, x, y[:, None], pool, generator, 500 if calibrated else 32, progress=False)
        if decay is not None:
            decay.step()
    net.eval()
    levels, errors, variances = held_out_outputs(net, *held_out, scheduler, pool, generator)
    return LearnedPredictor(net, fit_curve(levels, errors, flow=False), calibration_by_level(levels, errors, variances))


def held_out_outputs(net: nn.Module, x: torch.Tensor, y: torch.Tensor, scheduler, pool: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Points x (N, D) with labels y (N,), each noised at every timestep of `pool` (one level at a time: memory holds
    N points) -> (levels, squared errors, predicted variances or None), each (N * len(pool),)."""
    levels, errors, variances = [], [], []
    for timestep in pool:
        timesteps = timestep.expand(len(x))
        noisy = noised(scheduler, x, torch.randn(x.shape, generator=generator, dtype=x.dtype), timesteps)
        level = noise_level(scheduler, timesteps)
        error, variance = validation_outputs(net, noisy, y, level)
        levels.append(level), errors.append(error), variances.append(variance)
    return torch.cat(levels), torch.cat(errors), None if variances[0] is None else torch.cat(variances)


def pseudo_labels(x: torch.Tensor, y: torch.Tensor, unlabelled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels (M,) for `unlabelled` (M, D) from a least-squares fit on (x (N, D), y (N,)), with its residual noise."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weights = torch.linalg.lstsq(design, y[:, None]).solution
    residual = (y[:, None] - design @ weights).std()
    fitted = torch.cat([unlabelled, torch.ones(len(unlabelled), 1, dtype=x.dtype)], 1) @ weights
    return (fitted + residual * torch.randn(fitted.shape, generator=generator, dtype=x.dtype)).squeeze(1)


class ConditionalEps(nn.Module):
    """eps(x_t, y, level) (N, D): the paper's conditional diffusion model, told the label and sqrt(a), sqrt(1 - a).

    It predicts x0, as s W x_t + an MLP of (x_t, y, sqrt(a), sqrt(1 - a)) with W a learned D x D matrix, trained on the
    x0 error, and answers with the eps that x0 implies, (x_t - s x0) / n. Predicting eps directly, its errors at low
    noise grow by 1 / n in x0, and 12-17% of its samples' norm lay off the data's subspace; a clean estimate, with a
    linear path for the linear part of E[x0 | x_t], leaves 0.1-0.6%."""

    def __init__(self, dim: int, generator: torch.Generator, width: int = 256):
        super().__init__()
        self.net = mlp(dim + 3, dim, width, generator)
        self.skip = nn.Linear(dim, dim, bias=False).double()
        nn.init.zeros_(self.skip.weight)

    def clean(self, x_t: torch.Tensor, y: torch.Tensor | float, level: torch.Tensor) -> torch.Tensor:
        """The estimate of x0 (N, D)."""
        s = torch.as_tensor(level, dtype=x_t.dtype).reshape(-1, 1).expand(len(x_t), 1).sqrt()
        y = torch.as_tensor(y, dtype=x_t.dtype).reshape(-1, 1).expand(len(x_t), 1)
        return self.net(torch.cat([x_t, y, s, (1 - s**2).sqrt()], 1)) + s * self.skip(x_t)

    def forward(self, x_t: torch.Tensor, y: torch.Tensor | float, level: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(level, dtype=x_t.dtype).reshape(-1, 1).sqrt()
        return (x_t - s * self.clean(x_t, y, level)) / (1 - s**2).sqrt()


def train_conditional(x: torch.Tensor, y: torch.Tensor, scheduler, steps: int, generator: torch.Generator,
                      batch_size: int = 256) -> ConditionalEps:
    """Conditional denoising on (x (M, D), y (M,)) at the training schedule's timesteps, the x0 error its loss."""
    net = ConditionalEps(x.shape[1], generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    steps_total = scheduler.config.num_train_timesteps
    for _ in tqdm(range(steps), desc="conditional model", leave=False):
        picks = torch.randint(len(x), (batch_size,), generator=generator)
        timesteps = torch.randint(steps_total, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, x.shape[1], generator=generator, dtype=x.dtype)
        noisy = noised(scheduler, x[picks], noise, timesteps)
        loss = (net.clean(noisy, y[picks], noise_level(scheduler, timesteps)) - x[picks]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
    return net.eval()
