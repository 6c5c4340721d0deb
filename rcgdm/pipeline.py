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

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rcgdm.cli import InputError, UserError
from rcgdm.distributed import batches
from rcgdm.evaluate import distribution_shift, predicted_reward
from rcgdm.models import SD15, load_pipeline, model_facts
from rcgdm.pipeline_checks import (
    check_call,
    check_load,
    check_memory,
    check_predictor,
    checked_device,
    latent_size,
)
from rcgdm.predictor import TrainedPredictor, load_predictor
from rcgdm.rewards import Reward, load_reward
from rcgdm.sampling.families import FAMILIES, Family, check_sampling_inputs, family_of_pipe
from rcgdm.sampling.guidance import RewardGuidance, guidance_label
from rcgdm.sampling.posterior import POSTERIOR
from rcgdm.sampling.sampler import decode, sample_latents, sample_particle_latents
from rcgdm.sampling.schedulers import check_particle_scheduler, check_step_count, check_steps, make_scheduler, token_count
from rcgdm.seeds import image_generators


@dataclass(frozen=True)
class Scored:
    """One batch of images and what was measured on them (B images; tensors on the CPU, float32)."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    predicted_rewards: torch.Tensor  # (B,) the predictor on the VAE re-encoding of each image
    rewards: torch.Tensor | None  # (B,) the ground-truth reward; None without a reward model
    shift: torch.Tensor | None  # (B,) distance of the final latents to the predictor's training latents, or None
    ess: torch.Tensor | None = None  # (B, steps + 1) with particles: each step's effective share of them (Trace.ess)

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


def best_of_n(candidates: Iterable[Scored], picks: dict) -> dict:
    """Best-of-N over one batch's candidates 0, 1, ... (sampled lazily, as many as the largest N needs): per pick
    {key: (target T, N)}, per image, the candidate among the first N whose predicted reward is closest to T (ties:
    the earlier; candidate 0 is the plain image) -> {key: Scored}."""
    best, needed = {}, max(n for _, n in picks.values())
    for k, scored in zip(range(needed), candidates, strict=False):  # range first: no candidate past the last needed
        for key, (target, n) in picks.items():
            if k < n:
                best[key] = scored.closer_to(target, best[key]) if k else scored
    return best


@dataclass(frozen=True)
class Sampling:
    """How each image is sampled: denoising steps, classifier-free guidance scale and FLUX.1-dev's distilled guidance
    (None: the family's), the image size (None: the model's), and the particles per guided image (rcgdm/sampling/particles.py),
    denoised `particle_batch` at a time."""

    num_inference_steps: int | None = None
    cfg: float | None = None
    height: int | None = None
    width: int | None = None
    distilled_guidance: float | None = None
    particles: int = 1
    particle_batch: int = 4

    def with_particles(self, guidance: float | str) -> bool:
        """Whether an image at strength `guidance` is sampled with particles (unguided images never are)."""
        return self.particles > 1 and guidance != 0


class RewardDirectedPipeline:
    """A diffusers pipeline of a supported family (StableDiffusionPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline or FluxPipeline), a trained reward predictor and, optionally, the ground-truth reward its labels came
    from. Calling it samples with the paper's term added at every step and scores the images. Steps and the
    classifier-free guidance scale default to the family's own (rcgdm/sampling/families.py)."""

    def __init__(self, base, predictor: TrainedPredictor, reward: Reward | None = None, reward_meta: dict | None = None):
        self.base = base  # the diffusers pipeline whose components sample: its unet or transformer, VAE, scheduler
        self.predictor, self.reward, self.reward_meta = predictor, reward, reward_meta or {}
        self.family: Family = family_of_pipe(base)
        denoiser = getattr(base, self.family.denoiser).config
        self.facts = {"family": self.family.name, **self.family.latent_facts(denoiser),
                      "vae_scale_factor": base.vae_scale_factor}

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
        grad_path: str | None = None,
        height: int | None = None,
        width: int | None = None,
        facts: dict | None = None,
    ) -> RewardDirectedPipeline:
        """Load `model` (hub id, local diffusers folder, tiny, tiny-random; SD 1.x/2.x, SDXL or SD3) with `scheduler`
        (default: its family's, rcgdm/sampling/families.py), the predictor (train.py's checkpoint) and, if given, the ground-truth
        reward model (fake_dataset.py's; `user_reward` names a module:function reward it records). What configs and
        checkpoints can tell is checked before the pipeline's weights load; given the `grad_path` (and `height`,
        `width`) that calls will use, the predictor is checked for those too. `facts`: the model's configs as
        rcgdm.models.model_facts read them, when the caller has them already."""
        check_load(model=model, predictor=predictor, reward_model=reward_model, user_reward=user_reward,
                    scheduler=scheduler, dtype=dtype, ignore_provenance=ignore_provenance)
        device = checked_device(device)
        facts = facts or model_facts(model)
        *_, scheduler = FAMILIES[facts["family"]].fill(None, None, scheduler)
        check_steps(scheduler, facts["prediction_type"])
        if not isinstance(predictor, TrainedPredictor):
            predictor = load_predictor(predictor)
        check_predictor(predictor, facts, grad_path, None if grad_path is None else (height, width))
        reward, reward_meta = load_reward(reward_model, user_reward) if reward_model is not None else (None, {})
        if not ignore_provenance:
            predictor.check_trained_for(model, reward_model)
        base = load_pipeline(model, dtype, facts).to(device)
        base.scheduler = make_scheduler(scheduler, base.scheduler.config, facts["prediction_type"])
        base.set_progress_bar_config(disable=True)
        predictor = TrainedPredictor(predictor.net.to(device), predictor.meta, predictor.reference, predictor.path)
        return cls(base, predictor, None if reward is None else reward.to(device), reward_meta)

    def defaults(self, num_inference_steps: int | None, cfg: float | None) -> tuple[int, float]:
        """Steps and classifier-free guidance scale, the family's own where None."""
        steps, cfg, _ = self.family.fill(num_inference_steps, cfg)
        return steps, cfg

    def check(self, num_inference_steps: int, grad_path: str, height: int | None, width: int | None,
              distilled_guidance: float | None = None, particles: int = 1) -> None:
        """InputError unless this pipeline can sample with these settings as the predictor was trained for (and with
        particles, its scheduler steps them)."""
        if particles > 1:
            check_particle_scheduler(type(self.base.scheduler).__name__)
        check_sampling_inputs(self.family, self.facts["vae_scale_factor"], self.facts["patch_size"], height, width,
                              distilled_guidance)
        train_steps = self.base.scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise InputError("num_inference_steps", f"{num_inference_steps!r} is not an integer; expected 1 to {train_steps}")
        if not 1 <= num_inference_steps <= train_steps:
            raise InputError("num_inference_steps", f"{num_inference_steps} is outside the model's {train_steps} training "
                                                    f"timesteps; expected 1 to {train_steps}")
        check_predictor(self.predictor, self.facts, grad_path, (height, width))
        latents = latent_size(self.facts["sample_size"], self.facts["vae_scale_factor"], height, width)
        check_step_count(self.base.scheduler, num_inference_steps, self.family,
                         token_count(latents, self.facts["patch_size"]))

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) of the images sampled: as asked, else the model's default."""
        scale = self.facts["vae_scale_factor"]
        h, w = latent_size(self.facts["sample_size"], scale, height, width)
        return h * scale, w * scale

    def sample(self, prompt: str, reward_guidance: RewardGuidance | None, seed: int, indices, sampling: Sampling,
               candidate: int = 0, progress_bar: bool = True) -> Scored:
        """Images `indices` of a run seeded `seed` (candidate k of best-of-N; 0 is the plain image), one batch, scored.
        Image i starts from the seed (seed, i, candidate), so it is the same whatever batch it is sampled in."""
        generators = image_generators(seed, indices, candidate)
        steps, cfg = self.defaults(sampling.num_inference_steps, sampling.cfg)
        ess = None
        if reward_guidance is not None and sampling.with_particles(reward_guidance.guidance):
            latents, trace = sample_particle_latents(self.base, prompt, generators, reward_guidance, sampling.particles,
                                                     sampling.particle_batch, steps, cfg, sampling.height, sampling.width,
                                                     progress_bar, sampling.distilled_guidance)
            ess = trace.ess
        else:
            latents = sample_latents(self.base, prompt, generators, reward_guidance, steps, cfg, sampling.height,
                                     sampling.width, progress_bar, sampling.distilled_guidance)
        _check_finite(latents, "the final latents", reward_guidance, cfg)
        images = decode(self.base, latents, generators)
        rewards = None if self.reward is None else self.reward(images)
        predicted = predicted_reward(self.predictor.net, self.base.vae, images)[:, 0]
        if rewards is not None:
            _check_finite(rewards, "the ground-truth rewards", reward_guidance, cfg)
        _check_finite(predicted, "the predicted rewards", reward_guidance, cfg)
        return Scored(images, predicted, rewards, distribution_shift(latents, self.predictor.reference), ess)

    def __call__(
        self,
        prompt: str = "",
        target: float = 0.0,
        guidance: float | str = 0.0,
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
        distilled_guidance: float | None = None,
        particles: int = 1,
    ) -> Scored:
        """Sample `num_images` images of `prompt` steered toward predicted reward `target` with strength `guidance`
        (0: the plain model; "posterior": 1 / sigma_t^2 at each step, rcgdm/sampling/posterior.py), in batches of `batch_size`;
        `cfg` is the classifier-free guidance scale; best_of N keeps, per image, the candidate whose predicted reward is
        closest to the target. Steps and cfg default to the family's; `distilled_guidance` is FLUX.1-dev's guidance
        embedding (default: its pipeline's 3.5). particles=K > 1 samples each guided image from K particles
        (rcgdm/sampling/particles.py: twisted SMC, the term its proposal, exp(-guidance * loss) its weight), denoised
        `batch_size` at a time, with a scheduler that steps them (ddpm, euler_a or flow_euler); the result's `ess` holds
        their effective share per step."""
        num_inference_steps, cfg = self.defaults(num_inference_steps, cfg)
        check_call(prompt=prompt, target=target, guidance=guidance, cfg=cfg, num_images=num_images, seed=seed,
                    best_of=best_of, batch_size=batch_size, height=height, width=width, batch_mean=batch_mean,
                    distilled_guidance=distilled_guidance, particles=particles)
        sampling = Sampling(num_inference_steps, cfg, height, width, distilled_guidance, particles, batch_size)
        self.check(num_inference_steps, grad_path, height, width, distilled_guidance,
                   particles if sampling.with_particles(guidance) else 1)
        size = self.image_size(height, width)
        check_memory(num_images, batch_size, best_of, *size, self.base._execution_device, particles)
        steer = self.predictor.steer(target, guidance, batch_mean, grad_path)
        kept = []
        for indices in batches(num_images, batch_size):  # the batches inference.py --bs samples
            candidates = (self.sample(prompt, steer, seed, indices, sampling, k) for k in range(best_of))
            kept.append(best_of_n(candidates, {"call": (target, best_of)})["call"])
        return Scored.concat(kept)


class NonFiniteError(UserError):
    """Sampling diverged: NaN or inf in the latents or the rewards."""


def _check_finite(values: torch.Tensor, what: str, steer: RewardGuidance | None, cfg: float) -> None:
    """NaN or inf is never a result: stop with the likely cause."""
    if not torch.isfinite(values).all():
        posterior = callable(getattr(steer, "guidance", None)) or getattr(steer, "likelihood", False)
        strength = POSTERIOR if posterior else getattr(steer, "guidance", 0)
        where = "" if steer is None else f"target {steer.target:g}, guidance {guidance_label(strength)}, "
        raise NonFiniteError(f"{what} became NaN or inf at {where}--cfg {cfg:g}; likely cause: a guidance or cfg too large "
                        "for this model, or a damaged model; expected smaller values")
