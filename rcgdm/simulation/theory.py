"""Closed forms for the paper's simulation: Gaussian data on a linear subspace, a linear reward, noisy labels.

Data: x0 = A z with z ~ N(0, I_d) and A (D, d) with orthonormal columns, so x0 ~ N(0, S) with S = A A^T (rank d).
Reward r(x) = theta^T x; a label is y = r(x0) + N(0, sigma^2). Noising: x_t = s x0 + n eps, eps ~ N(0, I_D), with
(s, n) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) for diffusion and (1 - sigma, sigma) for flow matching.

Everything is jointly Gaussian, so each quantity below follows from the Gaussian conditioning formula
E[u | w] = E u + Cov(u, w) Cov(w)^-1 (w - E w), Var(u | w) = Var u - Cov(u, w) Cov(w)^-1 Cov(w, u):

- the noised data: x_t ~ N(0, C_t), C_t = s^2 S + n^2 I (full rank while n > 0), so its score is
  grad log p_t(x) = -C_t^-1 x, and E[eps | x_t] = -n grad log p_t(x_t) = n C_t^-1 x_t (Tweedie's formula), and
  E[x0 | x_t] = Cov(x0, x_t) C_t^-1 x_t = s S C_t^-1 x_t;
- the label given the noisy point: Cov(y, x_t) = s theta^T S and Var y = theta^T S theta + sigma^2, so
  E[y | x_t] = s theta^T S C_t^-1 x_t and Var(y | x_t) = Var y - s^2 theta^T S C_t^-1 S theta;
- the paper's target distribution: Cov(x0, y) = S theta, so
  p(x0 | y = a) = N(S theta a / Var y, S - S theta theta^T S / Var y), and its mean reward is
  E[r | y = a] = (theta^T S theta / Var y) a, short of a by the share of the label's variance that is noise.

Since E[y | x_t] is linear in x_t and Var(y | x_t) does not depend on x_t, grad log p_t(y = a | x_t) =
(a - E[y | x_t]) grad E[y | x_t] / Var(y | x_t): the paper's term with mu = E[y | x_t] and strength
1 / Var(y | x_t) turns the unconditional score into the conditional one exactly.

At s = 0 (alpha_bar = 0, sigma = 1): E[y | x_t] = 0 and its gradient vanish, so the eps shift is 0; yet the model
outputs that carry x0 do not. A v or flow model's output at s = 0 is -E[x0 | x_t, y] (v_prediction) or
x_t - E[x0 | x_t, y] (flow), which conditioning on y = a moves by -S theta a / Var y. The project's formula,
(output shift) = n g grad_x 1/2 (a - E[y | x_t])^2 / s, tends to exactly this as s -> 0, since the gradient is
s theta^T S C_t^-1 (`limit_output_shift`; rcgdm/sampling/guidance.py uses the limit for predictors that know the level).
All in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True)
class LinearGaussianWorld:
    """The simulation's data, reward and label noise. basis: A (D, d), orthonormal columns; theta: (D,); noise_std: sigma."""

    basis: torch.Tensor
    theta: torch.Tensor
    noise_std: float

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def data_cov(self) -> torch.Tensor:
        """S = A A^T (D, D)."""
        return self.basis @ self.basis.T

    @property
    def reward_var(self) -> float:
        """Var r(x0) = theta^T S theta."""
        return float(self.theta @ self.data_cov @ self.theta)

    @property
    def label_var(self) -> float:
        """Var y = theta^T S theta + sigma^2."""
        return self.reward_var + self.noise_std**2

    def noised_cov(self, s: float, n: float) -> torch.Tensor:
        """C_t = s^2 S + n^2 I (D, D)."""
        return s**2 * self.data_cov + n**2 * torch.eye(self.dim, dtype=F64)

    def score(self, x_t: torch.Tensor, s: float, n: float) -> torch.Tensor:
        """grad log p_t(x_t) = -C_t^-1 x_t for points x_t (N, D), n > 0."""
        return -torch.linalg.solve(self.noised_cov(s, n), x_t.T).T

    def eps_mean(self, x_t: torch.Tensor, s: float, n: float) -> torch.Tensor:
        """E[eps | x_t] = n C_t^-1 x_t (N, D): the exact unconditional epsilon model."""
        return -n * self.score(x_t, s, n)

    def x0_mean(self, x_t: torch.Tensor, s: float, n: float) -> torch.Tensor:
        """E[x0 | x_t] = s S C_t^-1 x_t (N, D)."""
        return s * torch.linalg.solve(self.noised_cov(s, n), x_t.T).T @ self.data_cov

    def label_weights(self, s: float, n: float) -> torch.Tensor:
        """b_t (D,) with E[y | x_t] = b_t^T x_t: b_t = s C_t^-1 S theta."""
        return s * torch.linalg.solve(self.noised_cov(s, n), self.data_cov @ self.theta)

    def label_var_given(self, s: float, n: float) -> float:
        """Var(y | x_t) = Var y - s theta^T S b_t."""
        return self.label_var - s * float(self.theta @ self.data_cov @ self.label_weights(s, n))

    def conditional(self, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and covariance (D, D) of p(x0 | y = a)."""
        cov_xy = self.data_cov @ self.theta
        return cov_xy * a / self.label_var, self.data_cov - torch.outer(cov_xy, cov_xy) / self.label_var

    def expected_reward(self, a: float) -> float:
        """E[r(x0) | y = a] = theta^T S theta a / Var y."""
        return self.reward_var * a / self.label_var

    def label_log_likelihood(self, x0: torch.Tensor, a: float) -> torch.Tensor:
        """log p(y = a | x0) = log N(a; theta^T x0, sigma^2) for points x0 (N, D) -> (N,)."""
        return -0.5 * ((a - x0 @ self.theta) / self.noise_std) ** 2 - math.log(self.noise_std * math.sqrt(2 * math.pi))

    def reward_std_given(self) -> float:
        """The std of r(x0) given y = a (the same for every a): sqrt(Var r - (Var r)^2 / Var y)."""
        return (self.reward_var - self.reward_var**2 / self.label_var) ** 0.5

    def limit_output_shift(self, a: float, prediction_type: str) -> torch.Tensor:
        """How conditioning on y = a moves a v or flow model's exact output at s = 0 (D,): -S theta a / Var y."""
        if prediction_type not in ("v_prediction", "flow_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}; expected v_prediction or flow_prediction")
        return -self.conditional(a)[0]

    def sample_data(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """x0 = A z (count, D)."""
        return torch.randn(count, self.basis.shape[1], generator=generator, dtype=F64) @ self.basis.T

    def sample_labelled(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (count, D) and their noisy labels y = theta^T x0 + N(0, sigma^2) (count,)."""
        x = self.sample_data(count, generator)
        return x, x @ self.theta + self.noise_std * torch.randn(count, generator=generator, dtype=F64)

    def sample_conditional(self, a: float, count: int, generator: torch.Generator) -> torch.Tensor:
        """Exact draws from p(x0 | y = a) (count, D), drawn in the subspace's coordinates (its covariance lies there)."""
        mean, cov = self.conditional(a)
        values, vectors = torch.linalg.eigh(self.basis.T @ cov @ self.basis)  # (d, d)
        z = torch.randn(count, len(values), generator=generator, dtype=F64)
        return mean + z @ (vectors * values.clamp(min=0).sqrt()).T @ self.basis.T

def make_world(dim: int, sub_dim: int, noise_std: float, off_subspace: float, generator: torch.Generator) -> LinearGaussianWorld:
    """A random subspace (D = dim, d = sub_dim) and a unit-norm theta with a share `off_subspace` of its squared norm
    outside the subspace (0: theta lies in it)."""
    if not 0 < sub_dim < dim:
        raise ValueError(f"sub_dim {sub_dim}; expected 0 < sub_dim < dim = {dim}")
    if not 0 <= off_subspace < 1:
        raise ValueError(f"off_subspace {off_subspace}; expected a share in [0, 1)")
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=F64))[0]
    inside, outside = basis[:, :sub_dim], basis[:, sub_dim:]
    on = inside @ torch.randn(sub_dim, generator=generator, dtype=F64)
    off = outside @ torch.randn(dim - sub_dim, generator=generator, dtype=F64)
    theta = on / on.norm() * (1 - off_subspace) ** 0.5 + off / off.norm() * off_subspace**0.5
    return LinearGaussianWorld(inside, theta, noise_std)
