"""Reward-directed sampling over the components of a diffusers pipeline of a supported family (rcgdm/sampling/families.py).

A short loop: encode the prompt, draw the initial latents (one torch.Generator per image), and at
every scheduler step combine classifier-free guidance, add the reward-guidance term, and step.
With guidance 0 it reproduces the stock pipeline's `__call__` exactly (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline), for the same generators.

FLUX's transformer reads the latents packed 2x2 into tokens. The loop keeps them unpacked, (B, 16, h, w), and
packs only around the transformer: packing is a fixed rearrangement, so the predictor, the term and the
scheduler's elementwise step see the ordinary latent image, and the steps equal the stock pipeline's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from rcgdm.sampling.families import Family, check_sampling_inputs, family_of_pipe
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.latent_scaling import for_decoder
from rcgdm.sampling.particles import Draws, Trace, sample_particles
from rcgdm.sampling.schedulers import next_levels, noise_levels, set_schedule, token_count


@dataclass(frozen=True)
class Setup:
    """What a batch's denoising needs, as the family's stock pipeline prepares it (`setup`)."""

    family: Family
    size: tuple[int, int]  # (height, width) of the images
    channels: int  # of the latents
    levels: torch.Tensor  # (steps,) the noise level at each step, float64 on the CPU (rcgdm/sampling/schedulers.py)
    prediction_type: str


def setup(pipe, steps: int, height: int | None, width: int | None, distilled_guidance: float | None) -> Setup:
    """Check the inputs and set the scheduler's schedule for `steps` steps (`sample_latents` documents the arguments)."""
    family = family_of_pipe(pipe)
    latent_facts = family.latent_facts(getattr(pipe, family.denoiser).config)
    check_sampling_inputs(family, pipe.vae_scale_factor, latent_facts["patch_size"], height, width, distilled_guidance)
    default = latent_facts["sample_size"] * pipe.vae_scale_factor
    height, width = height or default, width or default
    scheduler = pipe.scheduler
    tokens = token_count((height // pipe.vae_scale_factor, width // pipe.vae_scale_factor), latent_facts["patch_size"])
    set_schedule(scheduler, steps, family, tokens, pipe._execution_device)  # before the latents: they scale by its sigma
    return Setup(family, (height, width), latent_facts["in_channels"], noise_levels(scheduler),
                 family.prediction_type(scheduler.config.get("prediction_type")))


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
    distilled_guidance: float | None = None,
) -> torch.Tensor:
    """Denoise one batch (one image per generator; `cfg` is the classifier-free guidance scale, FLUX's true_cfg_scale;
    `distilled_guidance` FLUX.1-dev's guidance embedding, default its pipeline's) -> final latents
    (B, C, height / s, width / s), s = pipe.vae_scale_factor (8 for SD, 4 for the tiny model)."""
    run = setup(pipe, num_inference_steps, height, width, distilled_guidance)
    family, scheduler, batch = run.family, pipe.scheduler, len(generators)
    conditioning = prompt_conditioning(pipe, family, prompt, batch, cfg > 1, run.size, distilled_guidance)
    latents = initial_latents(pipe, family, run.channels, batch, run.size, conditioning[0]["encoder_hidden_states"].dtype,
                              generators)
    if (family.name == "sdxl" or family.packed) and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as their pipelines: step i sits at the i-th timestep, not one found by value
    step_kwargs = {} if family.flow else pipe.prepare_extra_step_kwargs(generators, 0.0)
    scale_input = (lambda x, t: x) if family.flow else scheduler.scale_model_input  # flow samplers take x_t as it is
    guided = reward_guidance is not None and reward_guidance.guidance != 0
    # moved to the device once: a step's value is then indexed there, with no per-step copy that would wait for the GPU
    levels = run.levels.to(latents.device, torch.float64 if latents.dtype == torch.float64 else torch.float32)

    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress_bar)):
        model_output = guided_by_cfg(pipe, family, latents, t, conditioning, cfg, scale_input)
        if guided:  # the paper's term; x_t is the model input (the variance-preserving latent, for any diffusion scheduler)
            x_t = scale_input(latents, t)
            model_output = reward_guidance.apply(model_output, x_t, levels[i], run.prediction_type)
        latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def sample_particle_latents(
    pipe,
    prompt: str,
    generators: list[torch.Generator],
    reward_guidance: RewardGuidance,
    particles: int,
    chunk: int,
    num_inference_steps: int = 50,
    cfg: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    progress_bar: bool = True,
    distilled_guidance: float | None = None,
) -> tuple[torch.Tensor, Trace]:
    """`sample_latents` with `particles` K per image (rcgdm/sampling/particles.py), denoised `chunk` at a time -> (final
    latents (B, C, h, w), the particles' Trace). The scheduler (ddpm, euler_a or flow_euler: schedulers.PARTICLE_SCHEDULERS)
    gives the timesteps and levels; the particles are held as x_t = s x0 + n eps and stepped ancestrally. Each image's
    particles start from its generator's draws (K of them: the first is the image's own start without particles)."""
    run = setup(pipe, num_inference_steps, height, width, distilled_guidance)
    family, scheduler, device, scale = run.family, pipe.scheduler, pipe._execution_device, pipe.vae_scale_factor
    conditioning = {}  # per chunk size, the prompt's conditioning for that many particles

    def conditioning_for(rows: int) -> list[dict]:
        if rows not in conditioning:
            conditioning[rows] = prompt_conditioning(pipe, family, prompt, rows, cfg > 1, run.size, distilled_guidance)
        return conditioning[rows]

    dtype = conditioning_for(min(chunk, particles * len(generators)))[0]["encoder_hidden_states"].dtype
    draws = Draws(generators, len(generators), device, dtype)
    start = draws.normal((particles, run.channels, run.size[0] // scale, run.size[1] // scale))
    levels, next_level = (v.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
                          for v in (run.levels, next_levels(scheduler)))
    with tqdm(total=len(levels), desc="denoising particles", leave=False, disable=not progress_bar) as bar:
        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:  # x_t is the model input: no scheduler scaling
            bar.update()
            t = scheduler.timesteps[i]
            return torch.cat([guided_by_cfg(pipe, family, piece, t, conditioning_for(len(piece)), cfg, lambda x, _: x)
                              for piece in x.split(chunk)])

        return sample_particles(denoise, levels, next_level, run.prediction_type, reward_guidance, start, draws)


def initial_latents(pipe, family: Family, channels: int, batch: int, size: tuple[int, int], dtype: torch.dtype,
                    generators: list[torch.Generator]) -> torch.Tensor:
    """The pipeline's own initial noise (B, channels, height / s, width / s) for images of `size` (height, width),
    unpacked for FLUX."""
    height, width = size
    latents = pipe.prepare_latents(batch, channels, height, width, dtype, pipe._execution_device, generators)
    if family.packed:  # FluxPipeline returns the packed tokens and their position ids
        scale = pipe.vae_scale_factor
        return unpack(latents[0], height // scale, width // scale)
    return latents


def guided_by_cfg(pipe, family: Family, latents: torch.Tensor, t: torch.Tensor, conditioning: list[dict], cfg: float,
                  scale_input) -> torch.Tensor:
    """The denoiser's output at `latents`, with classifier-free guidance uncond + cfg (cond - uncond) when `conditioning`
    holds an unconditional part: SD, SDXL and SD3 batch both halves in one call, FLUX calls once per prompt."""
    if family.packed:
        outputs = [denoise(pipe, family, latents, t, part) for part in conditioning]  # (prompt, negative prompt)
        return outputs[0] if len(outputs) == 1 else outputs[1] + cfg * (outputs[0] - outputs[1])
    use_cfg = cfg > 1
    model_output = denoise(pipe, family, scale_input(torch.cat([latents] * 2) if use_cfg else latents, t), t,
                           conditioning[0])
    if not use_cfg:
        return model_output
    uncond_output, text_output = model_output.chunk(2)
    return uncond_output + cfg * (text_output - uncond_output)


def prompt_conditioning(pipe, family: Family, prompt: str, batch: int, use_cfg: bool, size: tuple[int, int],
                        distilled_guidance: float | None = None) -> list[dict]:
    """The denoiser's conditioning for `batch` images of `prompt`, a dict per denoiser call (with classifier-free
    guidance, unconditional first): text embeddings; SDXL adds the pooled embedding and the size/crop time ids
    (original = target = `size`, no crop); SD3 the pooled projections; FLUX is rcgdm.sampling.sampler.flux_conditioning's."""
    device = pipe._execution_device
    if family.packed:
        return flux_conditioning(pipe, family, prompt, batch, use_cfg, size, distilled_guidance)
    if family.name == "sd":
        text, uncond = pipe.encode_prompt(prompt, device, batch, use_cfg)
        return [{"encoder_hidden_states": torch.cat([uncond, text]) if use_cfg else text}]
    prompts = {"prompt_2": None, "prompt_3": None} if family.name == "sd3" else {}
    text, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompt, **prompts, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=use_cfg
    )

    def with_uncond(unconditional: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
        return (torch.cat([unconditional, conditional]) if use_cfg else conditional).to(device)

    if family.name == "sd3":
        return [{"encoder_hidden_states": with_uncond(uncond, text), "pooled_projections": with_uncond(uncond_pooled, pooled)}]
    projection = pooled.shape[-1] if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=projection)
    added = {"text_embeds": with_uncond(uncond_pooled, pooled), "time_ids": with_uncond(time_ids, time_ids).repeat(batch, 1)}
    return [{"encoder_hidden_states": with_uncond(uncond, text), "added_cond_kwargs": added}]


def flux_conditioning(pipe, family: Family, prompt: str, batch: int, use_cfg: bool, size: tuple[int, int],
                      distilled_guidance: float | None) -> list[dict]:
    """FLUX's conditioning, as FluxPipeline builds it: the T5 sequence (family.text_length tokens), CLIP's pooled
    embedding, the text and latent-token position ids and, where the transformer has a guidance embedding, the
    distilled guidance (default: the family's); with classifier-free guidance, the empty prompt's second."""
    device, scale = pipe._execution_device, pipe.vae_scale_factor
    if pipe.transformer.config.guidance_embeds:
        value = family.distilled_guidance if distilled_guidance is None else distilled_guidance
        guidance = torch.full([1], value, device=device, dtype=torch.float32).expand(batch)
    else:
        guidance = None
    parts = []
    for text in (prompt, "") if use_cfg else (prompt,):
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                      num_images_per_prompt=batch, max_sequence_length=family.text_length)
        image_ids = pipe._prepare_latent_image_ids(batch, size[0] // scale // 2, size[1] // scale // 2, device,
                                                   embeds.dtype)
        parts.append({"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                      "img_ids": image_ids, "guidance": guidance})
    return parts


def denoise(pipe, family: Family, model_input: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """One call of the family's denoiser on model_input (B, C, h, w): the UNet (SD, SDXL), or the transformer, which
    takes a timestep per image (SD3; FLUX's in thousandths, on the packed tokens)."""
    if family.packed:
        timestep = t.expand(model_input.shape[0]).to(model_input.dtype) / 1000
        tokens = pipe.transformer(hidden_states=pack(model_input), timestep=timestep, **conditioning, return_dict=False)[0]
        return unpack(tokens, *model_input.shape[-2:])
    if family.denoiser == "transformer":
        timestep = t.expand(model_input.shape[0])
        return pipe.transformer(hidden_states=model_input, timestep=timestep, **conditioning, return_dict=False)[0]
    return pipe.unet(model_input, t, **conditioning, return_dict=False)[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> FLUX's tokens (B, h/2 * w/2, 4C): each 2x2 patch one token, channel-major within it."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: tokens (B, h/2 * w/2, 4C) -> latents (B, C, h, w)."""
    b, _, packed_channels = tokens.shape
    c = packed_channels // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Final latents -> float32 images (B, 3, H, W) in [0, 1] on the CPU, through the pipeline's VAE and image processor."""
    latents = latents.to(pipe.vae.dtype)  # a float32 VAE under a float16 model (SDXL) decodes float32 latents
    images = pipe.vae.decode(for_decoder(pipe.vae, latents), return_dict=False, generator=generators)[0]
    images = pipe.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * len(images))
    return images.float().cpu()
