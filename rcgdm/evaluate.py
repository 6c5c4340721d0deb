"""Scoring generated images, as the paper: the predictor on the VAE re-encoding of the decoded image (the
ground-truth reward, rcgdm/rewards, sees the decoded image itself); and how far each image has
drifted from the data the predictor was trained on (`distribution_shift`)."""

from __future__ import annotations

import torch
from torch import nn

from rcgdm.sampling.latent_scaling import for_denoiser


@torch.no_grad()
def predicted_reward(predictor: nn.Module, vae, images: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] -> mu(VAE latent) as float32 (B, 1) on the CPU (a net told the noise level
    is told the clean one).

    The latent is the posterior mean (SD's posterior is narrow, so a sample differs negligibly)."""
    param = next(vae.parameters())
    latents = for_denoiser(vae, vae.encode((images * 2 - 1).to(param.device, param.dtype)).latent_dist.mode())
    device = next(predictor.parameters()).device
    return predictor(latents.to(device, torch.float32))[:, :1].float().cpu()  # a calibrated net's variance dropped


NEAREST = 5


@torch.no_grad()
def distribution_shift(latents: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor | None:
    """Final latents (B, C, h, w) -> float32 (B,) on the CPU: the RMS distance (per latent element) to
    their 5 nearest training latents of the predictor (`reference`, (K, C, h, w)); None without a
    reference, or when the latents' shape differs from it. Unguided samples set the scale: guidance
    that extrapolates beyond the data moves latents away from every training latent."""
    if reference is None or latents.shape[1:] != reference.shape[1:]:
        return None
    flat = latents.float().cpu().flatten(1)
    distances = torch.cdist(flat, reference.float().flatten(1)) / flat.shape[1] ** 0.5
    return distances.topk(min(NEAREST, len(reference)), largest=False).values.mean(1)
