"""Device choice, seeding and provenance (package versions, file hashes)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

import numpy as np
import torch

from rcgdm.cli import UserError

_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "numpy", "rcgdm")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r} asks for CUDA but none is available; expected auto or cpu")
    return device


def package_versions() -> dict[str, str]:
    """Versions of the packages that change results, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            from rcgdm import __version__

            versions[name] = __version__ if name == "rcgdm" else "not installed"
    return versions


def image_seed(seed: int, index: int, candidate: int = 0) -> int:
    """A torch seed for item `index` of a run seeded `seed`, so that item never depends on batching.
    Candidate k > 0 of a best-of-N draw gets its own seed; candidate 0 is the plain image."""
    entropy = [seed, index] if candidate == 0 else [seed, index, candidate]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices, candidate: int = 0) -> list[torch.Generator]:
    """One CPU torch.Generator per item of `indices`, seeded by image_seed(seed, i, candidate)."""
    return [torch.Generator().manual_seed(image_seed(seed, i, candidate)) for i in indices]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
