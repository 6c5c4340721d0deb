"""Compressibility (as in DDPO): minus the JPEG size in kB at quality 95. No weights, works offline."""

from __future__ import annotations

import io

import torch
from PIL import Image

from rcgdm.rewards.base import Reward, at_reward_size

JPEG_QUALITY = 95


def jpeg_kilobytes(image: torch.Tensor) -> float:
    """Size in kB (1000 bytes) of one image (3, H, W) in [0, 1] as a quality-95 JPEG."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


class Compressibility(Reward):
    """Minus the JPEG size in kB: smaller files score higher (DDPO's compressibility)."""

    name = "compressibility"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([-jpeg_kilobytes(image) for image in at_reward_size(images).cpu()], dtype=torch.float32)
