"""Images as PNG files: float (3, H, W) tensors in [0, 1], written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rcgdm.files import atomic


def to_rgb(image) -> np.ndarray:
    """A PIL image of any mode Pillow reads -> uint8 (H, W, 3). 16- and 32-bit integer greys are scaled from their
    full range (a 16-bit mid-grey is 128, not white); alpha (RGBA, LA, PA, palette transparency) is composited over
    white, as a viewer shows it on a white page; other modes (CMYK, YCbCr, 1, L, P) go through Pillow's conversion.
    ValueError for modes with no known range (32-bit float) or no conversion."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.int64)
        grey = np.clip(np.round(wide * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("32-bit float pixels have no known range")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_png(path: str | Path) -> torch.Tensor:
    """A saved image -> float32 (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(to_rgb(image).astype(np.float32) / 255).permute(2, 0, 1)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """A float image (3, H, W) in [0, 1] -> 8-bit PNG at `path` (rounded)."""
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic.atomic_path(path) as tmp:  # looked up at the call: a test interrupts a run through it
        Image.fromarray(array).save(tmp, format="PNG")
