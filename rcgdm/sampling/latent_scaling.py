"""The VAE's latents as the denoiser sees them: z_model = (z_vae - shift_factor) * scaling_factor.

SD and SDXL VAEs have no shift factor (only scaling); SD3's and FLUX's have one. Encoding for training, scoring a decoded
image and decoding a sample all go through these two functions, so every family's latents are those its
denoiser was trained on.
"""

from __future__ import annotations

import torch


def for_denoiser(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (from its encoder) -> the denoiser's latents."""
    shift = vae.config.get("shift_factor")
    return (z if shift is None else z - shift) * vae.config.scaling_factor


def for_decoder(vae, latents: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents -> what the VAE decodes."""
    shift = vae.config.get("shift_factor")
    z = latents / vae.config.scaling_factor
    return z if shift is None else z + shift
