"""Images as PNG files: float (3, H, W) tensors in [0, 1], written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rcgdm.files import atomic


def load_png(path: str | Path) -> torch.Tensor:
    """A saved image -> float32 (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """A float image (3, H, W) in [0, 1] -> 8-bit PNG at `path` (rounded)."""
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic.atomic_path(path) as tmp:  # looked up at the call: a test interrupts a run through it
        Image.fromarray(array).save(tmp, format="PNG")
