"""How far samples (N, D) are from the answer: reward, off-subspace deviation, 2-Wasserstein, subspace angle. Float64."""

from __future__ import annotations

import torch


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative rounding errors clipped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_w2(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """2-Wasserstein distance between N(mean_a, cov_a) and N(mean_b, cov_b):
    W2^2 = |m_a - m_b|^2 + tr(C_a + C_b - 2 (C_b^1/2 C_a C_b^1/2)^1/2)."""
    root_b = sqrt_psd(cov_b)
    cross = sqrt_psd(root_b @ cov_a @ root_b)
    squared = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(squared.clamp(min=0).sqrt())


def fitted_w2(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """W2 between the Gaussian fitted to `samples` (N, D) and N(mean, cov)."""
    return gaussian_w2(samples.mean(0), torch.cov(samples.T), mean, cov)


def off_subspace(samples: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean over samples of ||(I - A A^T) x|| / ||x||: how far they leave the data's subspace (A: basis (D, d))."""
    inside = samples @ basis @ basis.T
    return float(((samples - inside).norm(dim=1) / samples.norm(dim=1).clamp(min=1e-12)).mean())


def principal_angle(samples: torch.Tensor, basis: torch.Tensor) -> float:
    """The largest principal angle, in degrees, between the span of the samples' top d principal directions and the
    span of `basis` (D, d): 0 when a model has recovered the data's subspace."""
    d = basis.shape[1]
    centred = samples - samples.mean(0)
    directions = torch.linalg.svd(centred, full_matrices=False)[2][:d].T  # (D, d)
    cosines = torch.linalg.svdvals(basis.T @ directions).clamp(max=1)
    return float(torch.rad2deg(torch.arccos(cosines.min())))


def mean_reward(samples: torch.Tensor, theta: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error) of r(x) = theta^T x over samples."""
    rewards = samples @ theta
    return float(rewards.mean()), float(rewards.std() / len(rewards) ** 0.5)
