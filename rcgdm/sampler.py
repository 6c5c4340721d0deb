"""Reward-directed sampling over the components of a diffusers pipeline of a supported family (rcgdm/families.py).

A short loop: encode the prompt, draw the initial latents (one torch.Generator per image), and at
every scheduler step combine classifier-free guidance, add the reward-guidance term, and step.
With guidance 0 it reproduces the stock pipeline's `__call__` exactly (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline), for the same generators.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from rcgdm.families import Family, family_of
from rcgdm.guidance import RewardGuidance
from rcgdm.latent_scaling import for_decoder
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
    family = family_of(type(pipe).__name__)
    denoiser = getattr(pipe, family.denoiser)
    device, batch = pipe._execution_device, len(generators)
    height = height or denoiser.config.sample_size * pipe.vae_scale_factor
    width = width or denoiser.config.sample_size * pipe.vae_scale_factor
    use_cfg = cfg > 1
    conditioning = prompt_conditioning(pipe, family, prompt, batch, use_cfg, (height, width))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    if family.name == "sdxl" and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline: step i sits at the i-th timestep, not one found by value
    dtype = conditioning["encoder_hidden_states"].dtype
    latents = pipe.prepare_latents(batch, denoiser.config.in_channels, height, width, dtype, device, generators)
    step_kwargs = {} if family.flow else pipe.prepare_extra_step_kwargs(generators, 0.0)
    scale_input = (lambda x, t: x) if family.flow else scheduler.scale_model_input  # flow samplers take x_t as it is
    # moved to the device once: a step's value is then indexed there, with no per-step copy that would wait for the GPU
    levels = noise_levels(scheduler).to(device, torch.float64 if latents.dtype == torch.float64 else torch.float32)
    prediction_type = family.prediction_type(scheduler.config.get("prediction_type"))
    guided = reward_guidance is not None and reward_guidance.guidance != 0

    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress_bar)):
        model_input = scale_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        model_output = denoise(pipe, family, model_input, t, conditioning)
        if use_cfg:
            uncond_output, text_output = model_output.chunk(2)
            model_output = uncond_output + cfg * (text_output - uncond_output)
        if guided:  # the paper's term; x_t is the model input (the variance-preserving latent, for any diffusion scheduler)
            x_t = scale_input(latents, t)
            model_output = reward_guidance.apply(model_output, x_t, levels[i], prediction_type)
        latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def prompt_conditioning(pipe, family: Family, prompt: str, batch: int, use_cfg: bool, size: tuple[int, int]) -> dict:
    """The denoiser's conditioning for `batch` images of `prompt` (unconditional first, with classifier-free guidance):
    text embeddings; SDXL adds the pooled embedding and the size/crop time ids (original = target = `size`, no crop);
    SD3 the pooled projections."""
    device = pipe._execution_device
    if family.name == "sd":
        text, uncond = pipe.encode_prompt(prompt, device, batch, use_cfg)
        return {"encoder_hidden_states": torch.cat([uncond, text]) if use_cfg else text}
    prompts = {"prompt_2": None, "prompt_3": None} if family.name == "sd3" else {}
    text, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompt, **prompts, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=use_cfg
    )

    def with_uncond(unconditional: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
        return (torch.cat([unconditional, conditional]) if use_cfg else conditional).to(device)

    if family.name == "sd3":
        return {"encoder_hidden_states": with_uncond(uncond, text), "pooled_projections": with_uncond(uncond_pooled, pooled)}
    projection = pooled.shape[-1] if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=projection)
    added = {"text_embeds": with_uncond(uncond_pooled, pooled), "time_ids": with_uncond(time_ids, time_ids).repeat(batch, 1)}
    return {"encoder_hidden_states": with_uncond(uncond, text), "added_cond_kwargs": added}


def denoise(pipe, family: Family, model_input: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """One call of the family's denoiser: the UNet (SD, SDXL) or the transformer, which takes a timestep per image (SD3)."""
    if family.denoiser == "transformer":
        timestep = t.expand(model_input.shape[0])
        return pipe.transformer(hidden_states=model_input, timestep=timestep, **conditioning, return_dict=False)[0]
    return pipe.unet(model_input, t, **conditioning, return_dict=False)[0]


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Final latents -> float32 images (B, 3, H, W) in [0, 1] on the CPU, through the pipeline's VAE and image processor."""
    latents = latents.to(pipe.vae.dtype)  # a float32 VAE under a float16 model (SDXL) decodes float32 latents
    images = pipe.vae.decode(for_decoder(pipe.vae, latents), return_dict=False, generator=generators)[0]
    images = pipe.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
    return images.float().cpu()
