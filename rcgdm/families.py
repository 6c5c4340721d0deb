"""The model families the paper's term is applied to, told apart by the pipeline class in model_index.json.

- SD 1.x/2.x (`StableDiffusionPipeline`): a UNet on variance-preserving latents, x_t = sqrt(a) x0 + sqrt(1 - a) eps.
- SDXL (`StableDiffusionXLPipeline`): the same noise, two text encoders, and added conditioning (the pooled
  text embedding and size/crop time ids) at every UNet call.
- SD3 (`StableDiffusion3Pipeline`): flow matching, x_t = (1 - sigma) x0 + sigma eps; the transformer predicts
  the velocity eps - x0 (rcgdm/guidance.py derives the term for it); 16-channel latents, a VAE shift factor.

Each family keeps its own pipeline's defaults (classifier-free guidance scale, steps, scheduler) where SD 1.5's
do not apply. Any other pipeline class is refused by name, with the reason where one is known.
"""

from __future__ import annotations

from dataclasses import dataclass

DIFFUSION_TYPES = ("epsilon", "v_prediction", "sample")  # what a diffusion (alpha_bar) model's scheduler config may say
FLOW_PREDICTION = "flow_prediction"  # the velocity eps - x0 of a flow-matching model
PREDICTION_TYPES = (*DIFFUSION_TYPES, FLOW_PREDICTION)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # diffusers class name in model_index.json
    denoiser: str  # the component that predicts: "unet" or "transformer"
    flow: bool  # flow matching (sigma schedule, velocity output) rather than an alpha_bar schedule
    cfg: float  # the pipeline's own default classifier-free guidance scale
    steps: int  # its default number of denoising steps
    scheduler: str  # its model's scheduler, a short name of rcgdm/schedulers.py
    label: str  # for messages and the README
    float32_vae: bool = False  # its VAE overflows in float16: with force_upcast its pipeline decodes in float32

    def prediction_type(self, configured: str | None) -> str:
        """What the denoiser predicts: a flow-matching family's velocity, whatever its scheduler config says, else
        the scheduler config's `prediction_type` (`configured`; default epsilon)."""
        return FLOW_PREDICTION if self.flow else configured or "epsilon"

    def fill(self, steps: int | None, cfg: float | None, scheduler: str | None = None) -> tuple[int, float, str]:
        """Steps, classifier-free guidance scale and scheduler: the family's own where None."""
        return steps or self.steps, self.cfg if cfg is None else cfg, scheduler or self.scheduler


FAMILIES = {
    "sd": Family("sd", "StableDiffusionPipeline", "unet", False, 7.5, 50, "pndm", "SD 1.x/2.x"),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", "unet", False, 5.0, 50, "euler", "SDXL", float32_vae=True),
    "sd3": Family("sd3", "StableDiffusion3Pipeline", "transformer", True, 7.0, 28, "flow_euler", "SD3"),
}
_BY_PIPELINE = {family.pipeline: family for family in FAMILIES.values()}
REFUSED = {  # known families and why the term is not applied to them
    "FluxPipeline": "FLUX is guidance-distilled (no classifier-free guidance to combine with) and packs its latents "
    "2x2 into tokens, which a convolutional latent predictor cannot read",
    "StableDiffusionXLImg2ImgPipeline": "an image-to-image pipeline (SDXL's refiner), not a text-to-image one",
}


def family_of(pipeline_class: str | None) -> Family | None:
    """The family of a model_index.json `_class_name`, or None."""
    return _BY_PIPELINE.get(pipeline_class)


def refusal(pipeline_class: str | None) -> str:
    """One line on why a pipeline class is not supported."""
    expected = ", ".join(f"a {f.pipeline} ({f.label})" for f in FAMILIES.values())
    reason = REFUSED.get(pipeline_class)
    return f"is a {pipeline_class!r}" + (f": {reason}" if reason else "") + f"; expected {expected}"
