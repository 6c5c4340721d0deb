"""The measures of rcgdm/image_distances.py against definitions and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from rcgdm.image_distances import diversity, image_features, median_bandwidth, mmd2

D, SIGMA, LENGTH, N, REPEATS = 4, 1.0, 2.0, 20, 200


def closed_form_mmd2(shift: float) -> float:
    """MMD^2 between N(0, SIGMA^2 I) and N(shift e_1, SIGMA^2 I) in D dimensions, Gaussian kernel of length LENGTH."""
    scale = LENGTH**2 + 2 * SIGMA**2
    return 2 * (LENGTH**2 / scale) ** (D / 2) * (1 - math.exp(-(shift**2) / (2 * scale)))


def estimates(shift: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(REPEATS):
        x = SIGMA * torch.randn(N, D, generator=generator, dtype=torch.float64)
        y = SIGMA * torch.randn(N, D, generator=generator, dtype=torch.float64)
        y[:, 0] += shift
        out.append(mmd2(x, y, LENGTH)[0])
    return torch.tensor(out)


def test_the_mmd_estimate_is_unbiased_zero_without_a_shift_and_grows_with_one():
    means = []
    for shift in (0.0, 1.0, 2.0):
        draws = estimates(shift)
        error = draws.std().item() / REPEATS**0.5
        assert abs(draws.mean().item() - closed_form_mmd2(shift)) < 3 * error, (shift, draws.mean().item(), error)
        means.append(draws.mean().item())
    assert means[0] < means[1] < means[2] and means[2] - means[0] > 0.2


def test_the_mmd_estimate_is_the_u_statistic_and_its_error_that_of_one():
    """Written out term by term, for one small sample."""
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(2))

    def k(a, b):
        return math.exp(-float((a - b).pow(2).sum()) / (2 * 1.5**2))

    h = [[k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for j in range(5)] for i in range(5)]
    off = [[h[i][j] for j in range(5) if j != i] for i in range(5)]
    row_means = torch.tensor([sum(r) / 4 for r in off])
    estimate, error = mmd2(x, y, 1.5)
    assert estimate == pytest.approx(sum(map(sum, off)) / 20, rel=1e-8)
    assert error == pytest.approx((4 * row_means.var().item() / 5) ** 0.5, rel=1e-8)
    assert mmd2(x, x, 1.5) == (0.0, 0.0)  # a sample against itself


def test_diversity_is_zero_for_identical_images_and_grows_with_their_spread():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert diversity(image_features(image.expand(4, -1, -1, -1))) == 0
    assert median_bandwidth(image_features(image.expand(4, -1, -1, -1))) is None  # no spread: no length scale
    noisy = [image_features((image + s * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))).clamp(0, 1))
             for s in (0.05, 0.2)]
    assert 0 < diversity(noisy[0]) < diversity(noisy[1])
    assert diversity(noisy[0][:1]) is None and image_features(image[None]).shape == (1, 3 * 16 * 16)
