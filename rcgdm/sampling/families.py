"""The model families the paper's term is applied to, told apart by the pipeline class in model_index.json.

- SD 1.x/2.x (`StableDiffusionPipeline`): a UNet on variance-preserving latents, x_t = sqrt(a) x0 + sqrt(1 - a) eps.
- SDXL (`StableDiffusionXLPipeline`): the same noise, two text encoders, and added conditioning (the pooled
  text embedding and size/crop time ids) at every UNet call.
- SD3 (`StableDiffusion3Pipeline`): flow matching, x_t = (1 - sigma) x0 + sigma eps; the transformer predicts
  the velocity eps - x0 (rcgdm/sampling/guidance.py derives the term for it); 16-channel latents, a VAE shift factor.
  SD3.5 (large, medium) is the same pipeline class: its transformer's qk norm and dual attention layers are
  the transformer's own business; skip-layer guidance is off, as the stock pipeline's default.
- FLUX (`FluxPipeline`): SD3's flow matching and latents, with the transformer reading them packed 2x2 into
  tokens (a fixed rearrangement: the sampler unpacks around it, so predictor and term see (B, 16, h, w));
  its flow schedule shifts with the image's token count (dynamic shifting). FLUX.1-dev's transformer has a
  guidance embedding, a conditioning value (distilled guidance, not classifier-free guidance); FLUX.1-schnell's
  has none and takes fewer steps and a shorter T5 sequence. Both share the latents a predictor is trained on.
  True classifier-free guidance (cfg > 1, against the empty prompt) is optional, as the stock pipeline's
  `true_cfg_scale`, and costs a second transformer call per step.

Each family keeps its own pipeline's defaults (classifier-free guidance scale, steps, scheduler) where SD 1.5's
do not apply. Any other pipeline class is refused by name, with the reason where one is known. rcgdm.steer, inside any
pipeline built on these denoisers (image-to-image, inpainting, ControlNet), tells the family by the denoiser instead
(`family_of_denoiser`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rcgdm.cli import InputError

DIFFUSION_TYPES = ("epsilon", "v_prediction", "sample")  # what a diffusion (alpha_bar) model's scheduler config may say
FLOW_PREDICTION = "flow_prediction"  # the velocity eps - x0 of a flow-matching model
PREDICTION_TYPES = (*DIFFUSION_TYPES, FLOW_PREDICTION)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # diffusers class name in model_index.json
    denoiser: str  # the component that predicts: "unet" or "transformer"
    flow: bool  # flow matching (sigma schedule, velocity output) rather than an alpha_bar schedule
    cfg: float  # the pipeline's own default classifier-free guidance scale (FLUX: true_cfg_scale)
    steps: int  # its default number of denoising steps
    scheduler: str  # its model's scheduler, a short name of rcgdm/sampling/schedulers.py
    label: str  # for messages and the README
    float32_vae: bool = False  # its VAE overflows in float16: with force_upcast its pipeline decodes in float32
    latents_of: str | None = None  # the family whose latents it shares (a predictor trained on either serves both)
    packed: bool = False  # the transformer reads 2x2 latent patches packed into tokens; its pipeline's other habits too:
    # sigmas linspace(1, 1/steps, steps) for set_timesteps, classifier-free guidance as two calls, timesteps / 1000
    distilled_guidance: float | None = None  # the guidance embedding's default value (FLUX.1-dev), or None: it has none
    text_length: int | None = None  # T5 tokens per prompt, its pipeline's max_sequence_length (FLUX)
    sample_size: int | None = None  # its pipeline's default latent size; None: the denoiser config's sample_size
    max_shift: float = 1.16  # dynamic shifting's max_shift where the scheduler config has none, as its pipeline's

    @property
    def latent_space(self) -> str:
        """The family a predictor records and is checked against: the latents it reads and how they are noised."""
        return self.latents_of or self.name

    def prediction_type(self, configured: str | None) -> str:
        """What the denoiser predicts: a flow-matching family's velocity, whatever its scheduler config says, else
        the scheduler config's `prediction_type` (`configured`; default epsilon)."""
        return FLOW_PREDICTION if self.flow else configured or "epsilon"

    def fill(self, steps: int | None, cfg: float | None, scheduler: str | None = None) -> tuple[int, float, str]:
        """Steps, classifier-free guidance scale and scheduler: the family's own where None."""
        return steps or self.steps, self.cfg if cfg is None else cfg, scheduler or self.scheduler

    def latent_channels(self, in_channels: int) -> int:
        """The latent channels of a denoiser that takes `in_channels` (four per packed token)."""
        return in_channels // 4 if self.packed else in_channels

    def patch(self, denoiser_config: dict) -> int:
        """How many latent pixels a side of one transformer token covers (SD3's patch size, FLUX's packing)."""
        return 2 if self.packed else denoiser_config.get("patch_size") or 1

    def latent_facts(self, denoiser_config: dict) -> dict:
        """What the latents are, from the denoiser's config: "in_channels" (latent channels: those the denoiser returns,
        as many as it takes in text-to-image; an inpainting UNet takes mask channels too), "sample_size" (the default
        latent size) and "patch_size" (`patch`)."""
        returned = denoiser_config.get("out_channels") or denoiser_config["in_channels"]  # FLUX's may leave it unset
        return {"in_channels": self.latent_channels(returned),
                "sample_size": self.sample_size or denoiser_config["sample_size"], "patch_size": self.patch(denoiser_config)}


_FLUX = {"packed": True, "text_length": 512, "sample_size": 128, "max_shift": 1.15}  # FluxPipeline's defaults
FAMILIES = {
    "sd": Family("sd", "StableDiffusionPipeline", "unet", False, 7.5, 50, "pndm", "SD 1.x/2.x"),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", "unet", False, 5.0, 50, "euler", "SDXL", float32_vae=True),
    "sd3": Family("sd3", "StableDiffusion3Pipeline", "transformer", True, 7.0, 28, "flow_euler", "SD3"),
    "flux": Family("flux", "FluxPipeline", "transformer", True, 1.0, 28, "flow_euler", "FLUX.1-dev",
                   distilled_guidance=3.5, **_FLUX),
    # diffusers' FLUX.1-schnell example: 4 steps, no guidance embedding, max_sequence_length 256
    "flux-schnell": Family("flux-schnell", "FluxPipeline", "transformer", True, 1.0, 4, "flow_euler", "FLUX.1-schnell",
                           latents_of="flux", **{**_FLUX, "text_length": 256}),
}
_BY_PIPELINE = {family.pipeline: family for family in FAMILIES.values() if family.latents_of is None}
REFUSED = {  # known families and why the term is not applied to them
    "StableDiffusionXLImg2ImgPipeline": "an image-to-image pipeline (SDXL's refiner), not a text-to-image one (rcgdm.steer "
                                        "guides it, inside the pipeline itself)",
}


def family_of(pipeline_class: str | None, denoiser_config: dict | None = None) -> Family | None:
    """The family of a model_index.json `_class_name`, or None; FLUX.1-schnell where a FluxPipeline's denoiser config
    (when given) shows no guidance embedding."""
    family = _BY_PIPELINE.get(pipeline_class)
    if family is not None and family.distilled_guidance is not None and denoiser_config is not None:
        return family if denoiser_config.get("guidance_embeds") else FAMILIES["flux-schnell"]
    return family


def family_of_pipe(pipe) -> Family:
    """The family of a loaded diffusers pipeline."""
    family = family_of(type(pipe).__name__)
    return family_of(family.pipeline, dict(getattr(pipe, family.denoiser).config))


DENOISERS = {  # a denoiser class -> (the families it serves, the text-to-image pipeline of its family)
    "UNet2DConditionModel": ("SD or SDXL", "StableDiffusionPipeline"),
    "SD3Transformer2DModel": ("SD3", "StableDiffusion3Pipeline"),
    "FluxTransformer2DModel": ("FLUX", "FluxPipeline"),
}


def family_of_denoiser(denoiser) -> Family | None:
    """The family of a pipeline's denoiser module (any pipeline built on it: image-to-image, inpainting, ControlNet), or
    None: SDXL's UNet takes the text and time ids (`addition_embed_type` "text_time"), SD's does not."""
    config = dict(denoiser.config)
    pipeline = DENOISERS.get(type(denoiser).__name__, (None, None))[1]
    if pipeline == "StableDiffusionPipeline" and config.get("addition_embed_type") == "text_time":
        pipeline = "StableDiffusionXLPipeline"
    return family_of(pipeline, config)


def refusal(pipeline_class: str | None) -> str:
    """One line on why a pipeline class is not supported."""
    expected = ", ".join(dict.fromkeys(f"a {f.pipeline}" for f in FAMILIES.values()))
    reason = REFUSED.get(pipeline_class)
    return f"is a {pipeline_class!r}" + (f": {reason}" if reason else "") + f"; expected {expected}"


def check_sampling_inputs(family: Family, scale: int, patch: int, height: int | None, width: int | None,
                          distilled_guidance: float | None) -> None:
    """InputError unless images of height x width (None: the model's) make whole latent tokens, a multiple of the
    VAE's `scale` times the denoiser's `patch` (8 for SD and SDXL, 16 for SD3 and FLUX), and distilled guidance is
    given only to a transformer with a guidance embedding (FLUX.1-dev). The API's, inference.py's and
    sample_latents' one check of these."""
    if distilled_guidance is not None and family.distilled_guidance is None:
        raise InputError("distilled_guidance", f"{distilled_guidance:g} is given, but {family.label}'s denoiser has no "
                                               "guidance embedding; expected none (FLUX.1-dev only)")
    multiple = scale * patch
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % multiple:
            raise InputError(name, f"{value} is not a multiple of {multiple} ({family.label}: the VAE's {scale}x times "
                                   f"{patch}x{patch} latent tokens); expected e.g. {value - value % multiple or multiple}")
