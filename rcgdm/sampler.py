"""Reward-directed sampling over the components of a diffusers StableDiffusionPipeline.

A short loop: encode the prompt, draw the initial latents (one torch.Generator per image), and at
every scheduler step combine classifier-free guidance, add the reward-guidance term, and step.
With guidance 0 it reproduces `StableDiffusionPipeline.__call__` exactly, for the same generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rcgdm.guidance import guide_output
from rcgdm.schedulers import noise_levels


@dataclass
class RewardGuidance:
    """Steer sampling toward predictor(x) == target with strength `scale` (the paper's `guidance`)."""

    predictor: nn.Module
    target: float
    scale: float
    batch_mean: bool = False
    grad_path: str = "xt"  # "x0": the predictor sees the denoised estimate (see rcgdm/guidance.py)


@torch.no_grad()
def sample_latents(
    pipe,
    prompt: str,
    generators: list[torch.Generator],
    guidance: RewardGuidance | None = None,
    num_inference_steps: int = 50,
    cfg: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Denoise one batch (one image per generator) -> final latents (B, C, height/8, width/8)."""
    device, batch = pipe._execution_device, len(generators)
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    use_cfg = cfg > 1
    text, uncond = pipe.encode_prompt(prompt, device, batch, use_cfg)
    embeddings = torch.cat([uncond, text]) if use_cfg else text
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, embeddings.dtype, device, generators)
    step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
    # moved to the device once: a step's value is then indexed there, with no per-step copy that would wait for the GPU
    alpha_bar = noise_levels(scheduler).to(device, torch.float64 if latents.dtype == torch.float64 else torch.float32)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")  # what `eps` below really is: see rcgdm/guidance.py

    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress)):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        eps = pipe.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        if use_cfg:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + cfg * (eps_text - eps_uncond)
        if guidance is not None and guidance.scale != 0:
            # the paper's term; x_t is the model input (the variance-preserving latent, for any scheduler)
            x_t = scheduler.scale_model_input(latents, t)
            g = guidance
            eps = guide_output(eps, x_t, alpha_bar[i], prediction_type, g.predictor, g.target, g.scale, g.batch_mean, g.grad_path)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Final latents -> float32 images (B, 3, H, W) in [0, 1] on the CPU, through the pipeline's VAE and image processor."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generators)[0]
    images = pipe.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
    return images.float().cpu()
