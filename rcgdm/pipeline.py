"""The Python API: Stable Diffusion with the paper's reward guidance, in diffusers' style.

    from rcgdm.pipeline import RewardDirectedPipeline

    pipe = RewardDirectedPipeline.from_pretrained("tiny", predictor="demo_out/convnet.pth")
    out = pipe("a yellow circle on a blue background", target=1.0, guidance=150.0, num_images=4, seed=0,
               num_inference_steps=20, cfg=3.0)
    out.images             # float32 (4, 3, H, W) in [0, 1]
    out.predicted_rewards  # float32 (4,): the predictor on each image's VAE re-encoding

inference.py samples through the same object, so for the same settings and seed it writes the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rcgdm.cli import MAX_SEED, InputError, UserError, text_problem
from rcgdm.distributed import batches, resolve_device
from rcgdm.evaluate import distribution_shift, predicted_reward
from rcgdm.families import FAMILIES, Family, family_of
from rcgdm.guidance import GRAD_PATHS, RewardGuidance
from rcgdm.models import SD15, load_pipeline, model_facts
from rcgdm.predictor import TrainedPredictor, load_predictor
from rcgdm.rewards import Reward, load_reward
from rcgdm.sampler import decode, sample_latents
from rcgdm.schedulers import check_step_count, check_steps, make_scheduler
from rcgdm.seeds import image_generators


@dataclass(frozen=True)
class Scored:
    """One batch of images and what was measured on them (B images; tensors on the CPU, float32)."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    predicted_rewards: torch.Tensor  # (B,) the predictor on the VAE re-encoding of each image
    rewards: torch.Tensor | None  # (B,) the ground-truth reward; None without a reward model
    shift: torch.Tensor | None  # (B,) distance of the final latents to the predictor's training latents, or None

    def closer_to(self, target: float, other: Scored) -> Scored:
        """Per image, this batch's image or `other`'s, whichever predicted reward is closer to `target` (ties: other's)."""
        closer = (self.predicted_rewards - target).abs() < (other.predicted_rewards - target).abs()

        def pick(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            if mine is None or theirs is None:
                return None
            return torch.where(closer.view(-1, *[1] * (mine.ndim - 1)), mine, theirs)

        return Scored(*(pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(Scored)))

    @staticmethod
    def concat(batches: list[Scored]) -> Scored:
        """Batches of one sample, in order, as one (a field None in the first batch is None in all)."""
        return Scored(*(None if getattr(batches[0], f.name) is None else torch.cat([getattr(b, f.name) for b in batches])
                        for f in fields(Scored)))


def latent_size(sample_size: int, vae_scale_factor: int, height: int | None, width: int | None) -> tuple[int, int]:
    """The (h, w) of the latents sampled for images of height x width (default: the model's, sample_size latents)."""
    default = sample_size * vae_scale_factor
    return (height or default) // vae_scale_factor, (width or default) // vae_scale_factor


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_load(**values) -> None:
    """InputError naming the first from_pretrained argument of the wrong type."""
    kinds = {"model": (str,), "predictor": (str, Path, TrainedPredictor), "reward_model": (str, Path, type(None)),
             "user_reward": (str, type(None)), "scheduler": (str, type(None)), "ignore_provenance": (bool,)}
    for name, kind in kinds.items():
        if not isinstance(values[name], kind):
            expected = " or ".join("None" if k is type(None) else k.__name__ for k in kind)
            raise InputError(name, f"{_shown(values[name])} is a {type(values[name]).__name__}; expected {expected}")
    if not isinstance(values["dtype"], torch.dtype) or values["dtype"] not in DTYPES:
        raise InputError("dtype", f"{_shown(values['dtype'])} is not supported; expected torch.float32, float16 or bfloat16")


def _device(device) -> torch.device:
    """A device name ("auto", "cpu", "cuda:1") or torch.device, checked usable."""
    if not isinstance(device, str | torch.device):
        raise InputError("device", f"{_shown(device)} is a {type(device).__name__}; expected a device name or torch.device")
    return resolve_device(str(device))


class RewardDirectedPipeline:
    """A diffusers pipeline of a supported family (`sd`: StableDiffusionPipeline, StableDiffusionXLPipeline or
    StableDiffusion3Pipeline), a trained reward predictor and, optionally, the ground-truth reward its labels came
    from. Calling it samples with the paper's term added at every step and scores the images. Steps and the
    classifier-free guidance scale default to the family's own (rcgdm/families.py)."""

    def __init__(self, sd, predictor: TrainedPredictor, reward: Reward | None = None, reward_meta: dict | None = None):
        self.sd, self.predictor, self.reward, self.reward_meta = sd, predictor, reward, reward_meta or {}
        self.family: Family = family_of(type(sd).__name__)

    @classmethod
    def from_pretrained(
        cls,
        model: str = SD15,
        predictor: str | Path | TrainedPredictor = "convnet.pth",
        reward_model: str | Path | None = None,
        *,
        user_reward: str | None = None,
        scheduler: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        ignore_provenance: bool = False,
    ) -> RewardDirectedPipeline:
        """Load `model` (hub id, local diffusers folder, tiny, tiny-random; SD 1.x/2.x, SDXL or SD3) with `scheduler`
        (default: its family's, rcgdm/families.py), the predictor (train.py's checkpoint) and, if given, the ground-truth
        reward model (fake_dataset.py's; `user_reward` names a module:function reward it records). What configs and
        checkpoints can tell is checked before the pipeline's weights load."""
        _check_load(model=model, predictor=predictor, reward_model=reward_model, user_reward=user_reward,
                    scheduler=scheduler, dtype=dtype, ignore_provenance=ignore_provenance)
        device = _device(device)
        facts = model_facts(model)
        family = FAMILIES[facts["family"]]
        *_, scheduler = family.fill(None, None, scheduler)
        check_steps(scheduler, facts["prediction_type"])
        if not isinstance(predictor, TrainedPredictor):
            predictor = load_predictor(predictor)
        predictor.check_family(family.name)
        predictor.check_latent_channels(facts["in_channels"])
        reward, reward_meta = load_reward(reward_model, user_reward) if reward_model is not None else (None, {})
        if not ignore_provenance:
            predictor.check_trained_for(model, reward_model)
        sd = load_pipeline(model, dtype).to(device)
        sd.scheduler = make_scheduler(scheduler, sd.scheduler.config, facts["prediction_type"])
        sd.set_progress_bar_config(disable=True)
        predictor = TrainedPredictor(predictor.net.to(device), predictor.meta, predictor.reference, predictor.path)
        return cls(sd, predictor, None if reward is None else reward.to(device), reward_meta)

    def defaults(self, num_inference_steps: int | None, cfg: float | None) -> tuple[int, float]:
        """Steps and classifier-free guidance scale, the family's own where None."""
        steps, cfg, _ = self.family.fill(num_inference_steps, cfg)
        return steps, cfg

    def check(self, num_inference_steps: int, grad_path: str, height: int | None, width: int | None) -> None:
        """InputError unless this pipeline can sample with these settings as the predictor was trained for."""
        train_steps = self.sd.scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise InputError("num_inference_steps", f"{num_inference_steps!r} is not an integer; expected 1 to {train_steps}")
        if not 1 <= num_inference_steps <= train_steps:
            raise InputError("num_inference_steps", f"{num_inference_steps} is outside the model's {train_steps} training "
                                                    f"timesteps; expected 1 to {train_steps}")
        check_step_count(self.sd.scheduler, num_inference_steps)
        if grad_path not in GRAD_PATHS:
            raise InputError("grad_path", f"{grad_path!r} is unknown; expected one of {', '.join(GRAD_PATHS)}")
        self.predictor.check_grad_path(grad_path)
        denoiser = getattr(self.sd, self.family.denoiser).config
        size = latent_size(denoiser.sample_size, self.sd.vae_scale_factor, height, width)
        patch = denoiser.get("patch_size", 1)  # SD3's transformer cuts the latents into patch x patch tokens
        for name, value in zip(("height", "width"), size, strict=True):
            if value % patch:
                multiple = patch * self.sd.vae_scale_factor
                raise InputError(name, f"{value * self.sd.vae_scale_factor} is not a multiple of {multiple}; expected "
                                       f"a multiple of {multiple} (latent patches of {patch})")
        self.predictor.check_latent_size(size, self.sd.vae_scale_factor)

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) of the images sampled: as asked, else the model's default."""
        denoiser = getattr(self.sd, self.family.denoiser).config
        h, w = latent_size(denoiser.sample_size, self.sd.vae_scale_factor, height, width)
        return h * self.sd.vae_scale_factor, w * self.sd.vae_scale_factor

    def sample(self, prompt: str, reward_guidance: RewardGuidance | None, seed: int, indices, candidate: int = 0,
               num_inference_steps: int | None = None, cfg: float | None = None, height: int | None = None,
               width: int | None = None, progress_bar: bool = True) -> Scored:
        """Images `indices` of a run seeded `seed` (candidate k of best-of-N; 0 is the plain image), one batch, scored.
        Image i starts from the seed (seed, i, candidate), so it is the same whatever batch it is sampled in."""
        generators = image_generators(seed, indices, candidate)
        num_inference_steps, cfg = self.defaults(num_inference_steps, cfg)
        latents = sample_latents(self.sd, prompt, generators, reward_guidance, num_inference_steps, cfg, height, width,
                                 progress_bar)
        _check_finite(latents, "the final latents", reward_guidance, cfg)
        images = decode(self.sd, latents, generators)
        rewards = None if self.reward is None else self.reward(images)
        predicted = predicted_reward(self.predictor.net, self.sd.vae, images)[:, 0]
        if rewards is not None:
            _check_finite(rewards, "the ground-truth rewards", reward_guidance, cfg)
        _check_finite(predicted, "the predicted rewards", reward_guidance, cfg)
        return Scored(images, predicted, rewards, distribution_shift(latents, self.predictor.reference))

    def __call__(
        self,
        prompt: str = "",
        target: float = 0.0,
        guidance: float = 0.0,
        *,
        num_images: int = 1,
        seed: int = 0,
        num_inference_steps: int | None = None,
        cfg: float | None = None,
        height: int | None = None,
        width: int | None = None,
        grad_path: str = "xt",
        batch_mean: bool = False,
        best_of: int = 1,
        batch_size: int = 4,
    ) -> Scored:
        """Sample `num_images` images of `prompt` steered toward predicted reward `target` with strength `guidance`
        (0: the plain model), in batches of `batch_size`; `cfg` is the classifier-free guidance scale; best_of N keeps,
        per image, the candidate whose predicted reward is closest to the target. Steps and cfg default to the family's."""
        num_inference_steps, cfg = self.defaults(num_inference_steps, cfg)
        _check_call(prompt=prompt, target=target, guidance=guidance, cfg=cfg, num_images=num_images, seed=seed,
                    best_of=best_of, batch_size=batch_size, height=height, width=width, batch_mean=batch_mean)
        self.check(num_inference_steps, grad_path, height, width)
        size = self.image_size(height, width)
        check_memory(num_images, batch_size, best_of, *size, self.sd._execution_device)
        steer = RewardGuidance(self.predictor.net, target, guidance, batch_mean, grad_path)
        kept = []
        for indices in batches(num_images, batch_size):  # the batches inference.py --bs samples
            best = None
            for candidate in range(best_of):
                scored = self.sample(prompt, steer, seed, indices, candidate, num_inference_steps, cfg, height, width)
                best = scored if best is None else scored.closer_to(target, best)
            kept.append(best)
        return Scored.concat(kept)


MAX_SIZE = 4096  # pixels a side, as inference.py's --height/--width
VAE_FULL_RES_CHANNELS = 128  # SD's VAE decoder runs its last blocks at full resolution with 128 channels


def _check_call(**values) -> None:
    """InputError naming the first call argument of the wrong type or out of range."""
    prompt = values["prompt"]
    if not isinstance(prompt, str) or text_problem(prompt):
        problem = text_problem(prompt) if isinstance(prompt, str) else f"is a {type(prompt).__name__}"
        raise InputError("prompt", f"{ascii(prompt)[:80]} {problem}; expected a text prompt")
    for name in ("target", "guidance", "cfg"):
        value = values[name]
        try:
            finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise InputError(name, f"{_shown(value)} is not a finite number; expected one")
    for name, low, high in (("num_images", 1, MAX_SEED), ("best_of", 1, MAX_SEED), ("batch_size", 1, MAX_SEED),
                            ("seed", 0, MAX_SEED), ("height", 8, MAX_SIZE), ("width", 8, MAX_SIZE)):
        value = values[name]
        if value is None and name in ("height", "width"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(name, f"{_shown(value)} is out of range; expected an integer from {low} to {high}")
        if name in ("height", "width") and value % 8:
            raise InputError(name, f"{value} is not a multiple of 8; expected e.g. {value - value % 8 or 8}")
    if not isinstance(values["batch_mean"], bool):
        raise InputError("batch_mean", f"{_shown(values['batch_mean'])} is not True or False; expected a bool")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} of {len(text)} characters"


def memory_needed(num_images: int, batch_size: int, best_of: int, height: int, width: int) -> tuple[int, str]:
    """A lower bound on the bytes a call (or one sweep combination, whose images the report holds) needs: its images
    (float32, 3 x height x width each), and one batch's decoding at full resolution (with a second batch kept for
    best-of-N) -> (bytes, how they add up)."""
    image = 3 * height * width * 4
    batch = min(batch_size, num_images)
    held = num_images * image
    decoding = batch * (VAE_FULL_RES_CHANNELS * height * width * 4 * 3 + image * (2 if best_of > 1 else 1))
    return held + decoding, f"{held / 1e9:.3g} GB of images held, {decoding / 1e9:.3g} GB to decode a batch"


def check_memory(num_images: int, batch_size: int, best_of: int, height: int, width: int, device: torch.device) -> None:
    """InputError before anything is allocated when `memory_needed` exceeds the device's memory."""
    needed, parts = memory_needed(num_images, batch_size, best_of, height, width)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    if needed > total:
        raise InputError("num_images", f"{num_images} images of {height}x{width} in batches of {batch_size} need at least "
                                       f"{needed / 1e9:.3g} GB ({parts}), more than the {total / 1e9:.3g} GB of {device.type}; "
                                       "expected fewer images, smaller batches or a smaller size")


class NonFiniteError(UserError):
    """Sampling diverged: NaN or inf in the latents or the rewards."""


def _check_finite(values: torch.Tensor, what: str, steer: RewardGuidance | None, cfg: float) -> None:
    """NaN or inf is never a result: stop with the likely cause."""
    if not torch.isfinite(values).all():
        where = "" if steer is None else f"target {steer.target:g}, guidance {steer.guidance:g}, "
        raise NonFiniteError(f"{what} became NaN or inf at {where}--cfg {cfg:g}; likely cause: a guidance or cfg too large "
                        "for this model, or a damaged model; expected smaller values")
