"""What the guidance bought and what it cost, measured on the images of a combination against the unguided images
of the same prompt: their diversity, and how far their distribution moved (an unbiased MMD^2 with its sampling error).

Images are compared through `image_features`: each image (3, H, W) in [0, 1], average-pooled to 3 x 16 x 16 and
flattened (768 numbers): what the reward sees at a glance, independent of any model, the same for every family.

MMD^2 (Gretton et al. 2012) with the Gaussian kernel k(a, b) = exp(-||a - b||^2 / (2 l^2)), l the median pairwise
distance of the unguided images' features (fixed per prompt, so every combination of a prompt is measured alike).
With n guided images x and n unguided images y, paired by index (image i of both starts from the same noise),
the unbiased estimate is the U-statistic

    MMD^2_u = 1 / (n (n - 1)) sum_{i != j} h_ij,   h_ij = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i),

whose expectation is exactly MMD^2 (0 when both distributions are the same; it can come out below 0). Its standard
error is that of a U-statistic of order 2, sqrt(4 var_i(hbar_i) / n), hbar_i = mean_{j != i} h_ij.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_SIZE = 16


def image_features(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> float64 features (N, 3 * 16 * 16): average-pooled, flattened."""
    return F.adaptive_avg_pool2d(images.double(), FEATURE_SIZE).flatten(1)


def diversity(features: torch.Tensor) -> float | None:
    """Mean pairwise distance between the rows of `features` (N, D), per feature (RMS): 0 for identical images;
    None for fewer than two."""
    n = len(features)
    if n < 2:
        return None
    distances = torch.cdist(features, features)[torch.triu_indices(n, n, 1).unbind()]
    return (distances / features.shape[1] ** 0.5).mean().item()


def median_bandwidth(features: torch.Tensor) -> float | None:
    """The median pairwise distance between the rows of `features` (the kernel's length scale); None when undefined."""
    n = len(features)
    if n < 2:
        return None
    median = torch.cdist(features, features)[torch.triu_indices(n, n, 1).unbind()].median().item()
    return median if median > 0 else None


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> tuple[float, float] | None:
    """(unbiased MMD^2 between the rows of x and y, its standard error), for features of paired samples (n, D) each
    (module docstring); None for fewer than three pairs (no standard error)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"mmd2 pairs its samples: got {n} and {len(y)} rows; expected as many of each")
    if n < 3:
        return None

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    kxy = kernel(x, y)
    h = kernel(x, x) + kernel(y, y) - kxy - kxy.T
    h.fill_diagonal_(0)
    row_means = h.sum(1) / (n - 1)
    estimate = h.sum().item() / (n * (n - 1))
    return estimate, (4 * row_means.var(correction=1).item() / n) ** 0.5
