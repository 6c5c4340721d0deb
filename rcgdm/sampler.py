"""Reward-directed sampling over the components of a diffusers StableDiffusionPipeline.

A short loop: encode the prompt, draw the initial latents (one torch.Generator per image), and at
every scheduler step combine classifier-free guidance, add the reward-guidance term, and step.
With guidance 0 it reproduces `StableDiffusionPipeline.__call__` exactly, for the same generators.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from rcgdm.guidance import RewardGuidance
from rcgdm.schedulers import noise_levels


@torch.no_grad()
def sample_latents(
    pipe,
    prompt: str,
    generators: list[torch.Generator],
    reward_guidance: RewardGuidance | None = None,
    num_inference_steps: int = 50,
    cfg: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    progress_bar: bool = True,
) -> torch.Tensor:
    """Denoise one batch (one image per generator; `cfg` is the classifier-free guidance scale)
    -> final latents (B, C, height / s, width / s), s = pipe.vae_scale_factor (8 for SD, 4 for the tiny model)."""
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
    prediction_type = scheduler.config.get("prediction_type", "epsilon")  # eps, v or x0: see rcgdm/guidance.py
    guided = reward_guidance is not None and reward_guidance.guidance != 0

    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress_bar)):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        model_output = pipe.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        if use_cfg:
            uncond_output, text_output = model_output.chunk(2)
            model_output = uncond_output + cfg * (text_output - uncond_output)
        if guided:  # the paper's term; x_t is the model input (the variance-preserving latent, for any scheduler)
            x_t = scheduler.scale_model_input(latents, t)
            model_output = reward_guidance.apply(model_output, x_t, alpha_bar[i], prediction_type)
        latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Final latents -> float32 images (B, 3, H, W) in [0, 1] on the CPU, through the pipeline's VAE and image processor."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generators)[0]
    images = pipe.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
    return images.float().cpu()
