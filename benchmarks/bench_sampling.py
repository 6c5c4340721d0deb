"""Guided sampling against the stock pipeline: the sampling loop's overhead, and on a GPU whole images per second."""

from __future__ import annotations

import torch
from timing import PROMPT, interleaved, paired_ratio, spread

from rcgdm.memory import PeakMemory
from rcgdm.models import load_pipeline
from rcgdm.predictor import ThreeLayerConvNet
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.sampler import decode, sample_latents
from rcgdm.seeds import image_generators


def bench_guidance(model: str, device: torch.device, dtype: torch.dtype, size: int, steps: int, batch: int, repeats: int) -> dict:
    """Our sampler at guidance 0 vs the stock pipeline, and guided vs guidance 0: latents only (no decode)."""
    pipe = load_pipeline(model, dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    predictor = ThreeLayerConvNet().to(device).eval()

    def generators():
        return image_generators(0, range(batch))

    common = {"num_inference_steps": steps, "height": size, "width": size}
    variants = {
        "stock": lambda: pipe(PROMPT, num_images_per_prompt=batch, generator=generators(), output_type="latent", **common),
        "ours_g0": lambda: sample_latents(pipe, PROMPT, generators(), None, progress_bar=False, **common),
        "ours_guided": lambda: sample_latents(
            pipe, PROMPT, generators(), RewardGuidance(predictor, 1.0, 100.0), progress_bar=False, **common
        ),
    }
    times = interleaved(variants, repeats, device)
    memory = {}
    for name, fn in variants.items():
        with PeakMemory(device) as peak:
            fn()
        memory[name] = peak.used
    return {
        "model": model,
        "size": size,
        "steps": steps,
        "batch": batch,
        "dtype": str(dtype),
        "seconds": {name: spread(t) for name, t in times.items()},
        "ratio_g0_vs_stock": paired_ratio(times["ours_g0"], times["stock"]),
        "ratio_guided_vs_g0": paired_ratio(times["ours_guided"], times["ours_g0"]),
        "peak_memory_bytes": memory,
        "memory_ratio_guided_vs_g0": memory["ours_guided"] / max(memory["ours_g0"], 1),
    }


def bench_images_per_second(model: str, device: torch.device, size: int, steps: int, batch: int, repeats: int) -> dict:
    """GPU only: whole images (sampling and decoding), fp16, guided and unguided, and the stock pipeline."""
    pipe = load_pipeline(model, torch.float16).to(device)
    pipe.set_progress_bar_config(disable=True)
    predictor = ThreeLayerConvNet().to(device).eval()

    def generators():
        return image_generators(0, range(batch))

    def ours(guidance):
        gens = generators()
        return decode(pipe, sample_latents(pipe, PROMPT, gens, guidance, steps, height=size, width=size,
            progress_bar=False), gens)

    variants = {
        "stock": lambda: pipe(PROMPT, num_images_per_prompt=batch, generator=generators(), num_inference_steps=steps,
                              height=size, width=size, output_type="pt"),
        "ours_unguided": lambda: ours(None),
        "ours_guided": lambda: ours(RewardGuidance(predictor, 1.0, 100.0)),
    }
    times = interleaved(variants, repeats, device)
    return {
        "size": size,
        "steps": steps,
        "batch": batch,
        "images_per_second": {name: spread([batch / t for t in ts]) for name, ts in times.items()},
        "ratio_guided_vs_unguided_time": paired_ratio(times["ours_guided"], times["ours_unguided"]),
        "ratio_unguided_vs_stock_time": paired_ratio(times["ours_unguided"], times["stock"]),
    }


def bench_particles(model: str, device: torch.device, size: int, steps: int, particles: int, repeats: int) -> dict:
    """One image from K particles (rcgdm/sampling/particles.py) against K images sampled plainly (unguided, and guided at the same
    strength), DDPM steps, the K denoised in one batch: per particle, the SMC's own bookkeeping beside the sampling."""
    from rcgdm.sampling.sampler import sample_particle_latents
    from rcgdm.sampling.schedulers import make_scheduler

    pipe = load_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddpm", pipe.scheduler.config)
    steer = RewardGuidance(ThreeLayerConvNet().to(device).eval(), 1.0, 100.0)
    common = {"num_inference_steps": steps, "height": size, "width": size, "progress_bar": False}
    variants = {
        "unguided_k_images": lambda: sample_latents(pipe, PROMPT, image_generators(0, range(particles)), None, **common),
        "guided_k_images": lambda: sample_latents(pipe, PROMPT, image_generators(0, range(particles)), steer, **common),
        "one_image_k_particles": lambda: sample_particle_latents(pipe, PROMPT, image_generators(0, [0]), steer, particles,
                                                                 particles, **common),
    }
    times = interleaved(variants, repeats, device)
    return {
        "model": model, "size": size, "steps": steps, "particles": particles,
        "seconds": {name: spread(t) for name, t in times.items()},
        "ratio_particles_vs_unguided": paired_ratio(times["one_image_k_particles"], times["unguided_k_images"]),
        "ratio_particles_vs_guided": paired_ratio(times["one_image_k_particles"], times["guided_k_images"]),
    }
