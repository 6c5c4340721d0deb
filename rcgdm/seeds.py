"""Reproducible seeds: item i of a run seeded s always starts from the same noise, whatever the batching."""

from __future__ import annotations

import numpy as np
import torch


def image_seed(seed: int, index: int, candidate: int = 0) -> int:
    """A torch seed for item `index` of a run seeded `seed`, so that item never depends on batching.
    Candidate k > 0 of a best-of-N draw gets its own seed; candidate 0 is the plain image."""
    entropy = [seed, index] if candidate == 0 else [seed, index, candidate]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices, candidate: int = 0) -> list[torch.Generator]:
    """One CPU torch.Generator per item of `indices`, seeded by image_seed(seed, i, candidate)."""
    return [torch.Generator().manual_seed(image_seed(seed, i, candidate)) for i in indices]
