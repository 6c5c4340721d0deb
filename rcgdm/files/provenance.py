"""What a run records about its inputs: file hashes and the versions of the packages that change results."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "numpy", "rcgdm")


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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
