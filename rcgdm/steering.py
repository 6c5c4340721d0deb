"""Reward guidance inside a stock diffusers pipeline: `steer` hooks the paper's term onto the pipeline's own denoiser.

    from rcgdm import steer

    with steer(pipe, "convnet.pth", target=1.0, guidance=100):
        images = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0)).images

The term needs three things at each step: the denoiser's input x_t, the noise level the pipeline's scheduler sits at,
and the denoiser's output. A forward hook on the pipeline's `unet` or `transformer` reads all three and returns the
output shifted as rcgdm's own loop shifts it (`RewardGuidance.shift`, rcgdm/sampling/sampler.py), so a pipeline built on a
supported denoiser and scheduler is guided without a loop of its own here: text-to-image, image-to-image, inpainting,
ControlNet, adapters, the user's callbacks.

- The level is the one the scheduler's next step takes (`step_position`, `noise_levels`: rcgdm/sampling/schedulers.py).
- x_t is the part of the denoiser's input its output has: the rest (an inpainting UNet's mask and image channels, FLUX
  Kontext's image tokens) is conditioning.
- Classifier-free guidance: the stock pipelines combine the unconditional and conditional outputs affinely, u + g (c - u)
  (both halves in one batch, or FLUX's true CFG in two calls), so the same shift added to each gives the combined output
  the paper's shift, up to float rounding. On grad_path "xt" the shift depends on x_t and the level alone, and a second
  call at the same step and x_t reuses it. On "x0" it depends on the combined output, which the hook forms from a batch
  of both halves and the pipeline's guidance_scale; a pipeline that combines several calls is refused on "x0".
  guidance_rescale > 0 is not affine and is refused.
- FLUX: the hook unpacks the tokens by the pipeline's own position ids (img_ids), so the predictor sees (B, 16, h, w)
  latents, as in rcgdm's loop.
- Particles (rcgdm/sampling/particles.py) resample between steps and need a loop of their own: RewardDirectedPipeline's.

Everything is refused in one line (rcgdm.cli.InputError) before a step is taken: a denoiser, scheduler or predictor this
cannot guide, a second steer on one denoiser, a guided call it cannot guide exactly. Leaving the context (an exception
included) removes the hook: the pipeline is the stock one again.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from rcgdm.cli import InputError
from rcgdm.pipeline_checks import check_predictor, check_steering
from rcgdm.predictor import TrainedPredictor, load_predictor
from rcgdm.sampling.families import DENOISERS, Family, family_of_denoiser
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.sampler import pack, unpack
from rcgdm.sampling.schedulers import check_schedule, check_steps, noise_levels, step_position

_STEERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> the Steering attached to it


@dataclass(frozen=True)
class _Shifted:
    """The shift last computed: where (the scheduler's step position), at which x_t (B, C, h, w) and for which output."""

    position: int
    x_t: torch.Tensor
    output: torch.Tensor
    shift: torch.Tensor


class Steering:
    """The paper's term on a pipeline's denoiser while attached (`steer` makes one): `with steering:` or
    `steering.attach()` ... `steering.detach()`."""

    def __init__(self, pipe, family: Family, guidance: RewardGuidance, predictor: TrainedPredictor):
        self.pipe, self.family, self.guidance, self.predictor = pipe, family, guidance, predictor
        self.denoiser = getattr(pipe, family.denoiser)
        self._signature = inspect.signature(self.denoiser.forward)
        self._input = "sample" if "sample" in self._signature.parameters else "hidden_states"
        self._handle = None
        self._last: _Shifted | None = None

    def attach(self) -> Steering:
        """Hook the term onto the denoiser (and move the predictor to the pipeline's device); InputError if a steer is
        attached to it already or its scheduler is not one the term is exact for."""
        if self.denoiser in _STEERED:
            raise InputError("pipe", f"its {type(self.denoiser).__name__} is steered already; expected one steer at a time "
                                     "on a pipeline (leave the first context, or detach it, first)")
        self._check_scheduler()
        self.predictor.net.to(self.pipe._execution_device)
        self._handle = self.denoiser.register_forward_hook(self._hook, with_kwargs=True)
        _STEERED[self.denoiser] = self
        return self

    def detach(self) -> None:
        """Remove the hook (nothing if not attached): the pipeline is the stock one again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle, self._last = None, None
            _STEERED.pop(self.denoiser, None)

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exception) -> None:
        self.detach()

    def _check_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        name = type(scheduler).__name__
        check_schedule(name, check_steps(name, self.prediction_type), scheduler.config)

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self.pipe.scheduler.config.get("prediction_type"))

    def _hook(self, denoiser, args: tuple, kwargs: dict, output):
        if self.guidance.guidance == 0:
            return None
        inputs = self._signature.bind(*args, **kwargs).arguments
        sample = output[0] if isinstance(output, tuple) else output.sample
        shifted = self._shifted(sample, inputs[self._input], inputs["timestep"], inputs.get("img_ids"))
        if isinstance(output, tuple):
            return (shifted, *output[1:])
        return type(output)(**{**output, "sample": shifted})

    def _shifted(self, output: torch.Tensor, model_input: torch.Tensor, timestep: torch.Tensor,
                 ids: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's output (B, C, h, w), or FLUX's tokens (B, N, 4C), shifted by the paper's term."""
        self._check_call()
        x_t = model_input[tuple(slice(0, n) for n in output.shape)]
        if self.family.packed:
            h, w = token_grid(ids, output.shape[1])
            x_t, output = unpack(x_t, h, w), unpack(output, h, w)
        self.predictor.check_latent_size(tuple(x_t.shape[-2:]), self.pipe.vae_scale_factor)
        position, level = self._level(x_t, timestep)
        halves = self._cfg_halves(x_t)
        x = x_t[: len(x_t) // 2] if halves else x_t
        shift = self._shift(output, x, halves, position, level)
        output = output + (torch.cat([shift, shift]) if halves else shift)
        return pack(output) if self.family.packed else output

    def _check_call(self) -> None:
        """InputError for a call the hook cannot guide exactly: a scheduler swapped in that it cannot, guidance_rescale."""
        self._check_scheduler()
        rescale = getattr(self.pipe, "guidance_rescale", 0.0)
        if rescale > 0 and self._cfg:
            raise InputError("guidance_rescale", f"{rescale:g} rescales the classifier-free guidance output by its spread, "
                                                 "which no shift added to both halves survives; expected 0")

    def _level(self, x_t: torch.Tensor, timestep: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(The scheduler's step position, its noise level there as a 0-dim tensor of x_t's float dtype)."""
        scheduler = self.pipe.scheduler
        t = timestep.reshape(-1)[0] * (1000 if self.family.packed else 1)  # FLUX's transformer is told t / 1000
        position = step_position(scheduler, t)
        if position is None:
            raise InputError("scheduler", f"{type(scheduler).__name__} holds no step at timestep {float(t):g}, where the "
                                          "denoiser was called; expected a pipeline that steps its own scheduler")
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        return position, noise_levels(scheduler)[position].to(x_t.device, dtype)

    def _cfg_halves(self, x_t: torch.Tensor) -> bool:
        """Whether the rows are classifier-free guidance's two halves (unconditional first) of one batch of images."""
        rows = len(x_t)
        return self._cfg and rows % 2 == 0 and torch.equal(x_t[: rows // 2], x_t[rows // 2:])

    @property
    def _cfg(self) -> bool:
        """Whether the pipeline's call runs classifier-free guidance in one batch of both halves."""
        return getattr(self.pipe, "do_classifier_free_guidance", False)

    def _shift(self, output: torch.Tensor, x_t: torch.Tensor, halves: bool, position: int,
               level: torch.Tensor) -> torch.Tensor:
        """The term's shift for each image of x_t (B, C, h, w): the one computed last where the step and x_t are its and
        the shift cannot depend on the output (grad_path "xt"), or the output is the same (the call repeated)."""
        last = self._last
        same_step = last is not None and last.position == position and torch.equal(last.x_t, x_t)
        if same_step and (self.guidance.grad_path == "xt" or torch.equal(last.output, output)):
            return last.shift
        if self.guidance.grad_path == "x0" and (same_step or (self._cfg and not halves)):
            raise InputError("grad_path", "'x0' needs the output this pipeline combines from several denoiser calls, which "
                                          "a hook on one call does not see; expected 'xt'")
        combined = output
        if halves:  # grad_path x0 reads the combined output, as the pipeline forms it
            uncond, cond = output.chunk(2)
            combined = uncond + self.pipe.guidance_scale * (cond - uncond)
        shift, _ = self.guidance.shift(combined, x_t, level, self.prediction_type)
        self._last = _Shifted(position, x_t.clone(), output.clone(), shift)
        return shift


def token_grid(ids: torch.Tensor | None, tokens: int) -> tuple[int, int]:
    """(h, w) of the latents whose 2x2 patches the first `tokens` of FLUX's position ids (N, 3) lay out row by row, as
    rcgdm.sampling.sampler.pack orders them; InputError otherwise."""
    if ids is None:
        raise InputError("pipe", "its transformer was called without img_ids; expected FLUX's position ids")
    ids = (ids[0] if ids.ndim == 3 else ids)[:tokens].long()
    width = int(ids[:, 2].max()) + 1
    order = torch.arange(tokens, device=ids.device)
    if tokens % width or not (torch.equal(ids[:, 1], order // width) and torch.equal(ids[:, 2], order % width)):
        raise InputError("pipe", "its latent tokens are not laid out row by row by their position ids; expected FLUX's "
                                 "latent image ids")
    return 2 * (tokens // width), 2 * width


def steer(pipe, predictor: TrainedPredictor | str | Path, target: float, guidance: float | str, *, grad_path: str = "xt",
          batch_mean: bool = False) -> Steering:
    """The paper's term toward predicted reward `target` at strength `guidance` (a number, or "posterior") on `pipe`'s
    denoiser, for `with steer(...):` (or attach/detach): a diffusers pipeline whose denoiser is SD's or SDXL's UNet, SD3's
    or FLUX's transformer, with a scheduler the term is exact for (rcgdm/sampling/schedulers.py), and a predictor train.py trained
    on that family's latents (a TrainedPredictor, or its checkpoint's path). `grad_path` and `batch_mean` as
    RewardDirectedPipeline's; particles stay in RewardDirectedPipeline's loop."""
    denoiser = next((getattr(pipe, name) for name in ("unet", "transformer") if getattr(pipe, name, None) is not None), None)
    family = None if denoiser is None else family_of_denoiser(denoiser)
    if family is None:
        found = "no unet or transformer" if denoiser is None else f"a {type(denoiser).__name__}"
        supported = [f"{name} ({label})" for name, (label, _) in DENOISERS.items()]
        raise InputError("pipe", f"{type(pipe).__name__} has {found}; expected a pipeline whose denoiser is one of "
                                 + ", ".join(supported))
    check_steering(target, guidance, batch_mean)
    if not isinstance(predictor, TrainedPredictor):
        predictor = load_predictor(predictor)
    check_predictor(predictor, {"family": family.name, **family.latent_facts(dict(denoiser.config))}, grad_path)
    return Steering(pipe, family, predictor.steer(target, guidance, batch_mean, grad_path), predictor)
