"""What the Python API checks before it does any work: the types and ranges of its arguments, the predictor against
the model and the call (shared with inference.py), and whether a call's images fit in memory. Each failure is an
InputError naming the argument."""

from __future__ import annotations

from pathlib import Path

import torch

from rcgdm.cli import MAX_SEED, InputError, finite32, text_problem
from rcgdm.distributed import resolve_device
from rcgdm.predictor import TrainedPredictor
from rcgdm.sampling.guidance import GRAD_PATHS
from rcgdm.sampling.particles import MAX_PARTICLES
from rcgdm.sampling.posterior import POSTERIOR


def latent_size(sample_size: int, vae_scale_factor: int, height: int | None, width: int | None) -> tuple[int, int]:
    """The (h, w) of the latents sampled for images of height x width (default: the model's, sample_size latents)."""
    default = sample_size * vae_scale_factor
    return (height or default) // vae_scale_factor, (width or default) // vae_scale_factor


def check_predictor(predictor: TrainedPredictor, facts: dict, grad_path: str | None = None,
                    size: tuple[int | None, int | None] | None = None) -> None:
    """InputError unless `predictor` serves the model `facts` describe (rcgdm.models.model_facts: its family, latent
    channels, size, patch and VAE scale): the family and channels always; the gradient path and the (height, width)
    sampled (None: the model's default) when given. The one check of a predictor against a run: the API's and
    inference.py's."""
    predictor.check_family(facts["family"])
    predictor.check_latent_channels(facts["in_channels"])
    if grad_path is not None:
        if grad_path not in GRAD_PATHS:
            raise InputError("grad_path", f"{grad_path!r} is unknown; expected one of {', '.join(GRAD_PATHS)}")
        predictor.check_grad_path(grad_path)
    if size is None:
        return
    scale, patch = facts["vae_scale_factor"], facts["patch_size"]  # SD3's transformer cuts latents into patch x patch
    latents = latent_size(facts["sample_size"], scale, *size)
    for name, value in zip(("height", "width"), latents, strict=True):
        if value % patch:
            raise InputError(name, f"{value * scale} is not a multiple of {patch * scale}; expected a multiple of "
                                   f"{patch * scale} (latent patches of {patch})")
    predictor.check_latent_size(latents, scale)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_load(**values) -> None:
    """InputError naming the first from_pretrained argument of the wrong type."""
    kinds = {"model": (str,), "predictor": (str, Path, TrainedPredictor), "reward_model": (str, Path, type(None)),
             "user_reward": (str, type(None)), "scheduler": (str, type(None)), "ignore_provenance": (bool,)}
    for name, kind in kinds.items():
        if not isinstance(values[name], kind):
            expected = " or ".join("None" if k is type(None) else k.__name__ for k in kind)
            raise InputError(name, f"{_shown(values[name])} is a {type(values[name]).__name__}; expected {expected}")
    if not isinstance(values["dtype"], torch.dtype) or values["dtype"] not in DTYPES:
        raise InputError("dtype", f"{_shown(values['dtype'])} is not supported; expected torch.float32, float16 or bfloat16")


def checked_device(device) -> torch.device:
    """A device name ("auto", "cpu", "cuda:1") or torch.device, checked usable."""
    if not isinstance(device, str | torch.device):
        raise InputError("device", f"{_shown(device)} is a {type(device).__name__}; expected a device name or torch.device")
    return resolve_device(str(device))


MAX_SIZE = 4096  # pixels a side, as inference.py's --height/--width
VAE_FULL_RES_CHANNELS = 128  # SD's VAE decoder runs its last blocks at full resolution with 128 channels


def check_call(**values) -> None:
    """InputError naming the first call argument of the wrong type or out of range."""
    prompt = values["prompt"]
    if not isinstance(prompt, str) or text_problem(prompt):
        problem = text_problem(prompt) if isinstance(prompt, str) else f"is a {type(prompt).__name__}"
        raise InputError("prompt", f"{ascii(prompt)[:80]} {problem}; expected a text prompt")
    check_steering(values["target"], values["guidance"], values["batch_mean"])
    for name in ("cfg", "distilled_guidance"):
        if not (name == "distilled_guidance" and values[name] is None):
            check_number(name, values[name], "one, or None" if name == "distilled_guidance" else "one")
    for name, low, high in (("num_images", 1, MAX_SEED), ("best_of", 1, MAX_SEED), ("batch_size", 1, MAX_SEED),
                            ("particles", 1, MAX_PARTICLES),
                            ("seed", 0, MAX_SEED), ("height", 8, MAX_SIZE), ("width", 8, MAX_SIZE)):
        value = values[name]
        if value is None and name in ("height", "width"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(name, f"{_shown(value)} is out of range; expected an integer from {low} to {high}")
        if name in ("height", "width") and value % 8:
            raise InputError(name, f"{value} is not a multiple of 8; expected e.g. {value - value % 8 or 8}")
    if values["particles"] > 1 and values["batch_mean"]:
        raise InputError("batch_mean", "True with particles: the original code's batch-mean strength depends on the batch, "
                                       "and particles change it; expected batch_mean=False")


def check_number(name: str, value, expected: str = "one") -> None:
    """InputError unless `value` is a finite number in float32's range (each is used in float32)."""
    if not finite32(value):
        raise InputError(name, f"{_shown(value)} is not a finite number in float32's range; expected {expected}")


def check_steering(target, guidance, batch_mean) -> None:
    """InputError unless the guidance settings are a number `target`, a number or "posterior" `guidance`, and a bool
    `batch_mean`: the API's and rcgdm.steer's check."""
    check_number("target", target)
    if guidance != POSTERIOR:
        check_number("guidance", guidance, f"a finite number or {POSTERIOR!r}")
    if not isinstance(batch_mean, bool):
        raise InputError("batch_mean", f"{_shown(batch_mean)} is not True or False; expected a bool")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} of {len(text)} characters"


PARTICLE_COPIES = 8  # what particles hold per particle at a step: x_t, two outputs, two step means, the noise, spares


def memory_needed(num_images: int, batch_size: int, best_of: int, height: int, width: int,
                  particles: int = 1) -> tuple[int, str]:
    """A lower bound on the bytes a call (or one sweep combination, whose images the report holds) needs: its images
    (float32, 3 x height x width each), one batch's decoding at full resolution (with a second batch kept for
    best-of-N) and, with K > 1 `particles`, a batch's K particles (float32 latents of 4 channels at 1/8 the size, the
    fewest of any family, PARTICLE_COPIES each) -> (bytes, how they add up)."""
    image = 3 * height * width * 4
    batch = min(batch_size, num_images)
    held = num_images * image
    decoding = batch * (VAE_FULL_RES_CHANNELS * height * width * 4 * 3 + image * (2 if best_of > 1 else 1))
    particle_bytes = 0 if particles == 1 else batch * particles * PARTICLE_COPIES * 4 * (height // 8) * (width // 8) * 4
    return held + decoding + particle_bytes, (f"{held / 1e9:.3g} GB of images held, {decoding / 1e9:.3g} GB to decode a batch"
                                              + (f", {particle_bytes / 1e9:.3g} GB of particles" if particle_bytes else ""))


def check_memory(num_images: int, batch_size: int, best_of: int, height: int, width: int, device: torch.device,
                 particles: int = 1) -> None:
    """InputError before anything is allocated when `memory_needed` exceeds the device's memory."""
    needed, parts = memory_needed(num_images, batch_size, best_of, height, width, particles)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    if needed > total:
        raise InputError("num_images", f"{num_images} images of {height}x{width} in batches of {batch_size} need at least "
                                       f"{needed / 1e9:.3g} GB ({parts}), more than the {total / 1e9:.3g} GB of {device.type}; "
                                       "expected fewer images, smaller batches or a smaller size")
