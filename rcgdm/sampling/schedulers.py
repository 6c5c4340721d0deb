"""The samplers the guidance is exact for, and the noise level each one sits at, step by step.

The paper's term is scaled by alpha_bar at the current step (rcgdm/sampling/guidance.py). Two kinds of
diffusers scheduler place their steps differently:

- "alphas" (PNDM, DDIM, DDPM) step on integer training timesteps: alpha_bar = alphas_cumprod[t].
- "sigmas" (Euler, Euler ancestral, Heun, LMS, DPM++, UniPC) step on a sigma schedule that need not
  sit on a training timestep (Karras, exponential or beta sigmas; Euler's continuous timesteps, where
  t is 0.25 log sigma). Their model input is the latent scaled to the variance-preserving form, so
  x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = 1 / (1 + sigma_i^2), sigma_i = scheduler.sigmas[i] for
  the i-th entry of scheduler.timesteps (Heun repeats timesteps and sigmas alike).
- "flow" (flow-matching Euler and Heun, for SD3 and FLUX) step on sigmas of x_t = (1 - sigma) x0 + sigma eps, and
  the level is sigma_i = scheduler.sigmas[i] itself (= timesteps[i] / num_train_timesteps); they step only a
  velocity-predicting model, and the diffusion samplers only the others. A schedule with dynamic shifting (FLUX.1-dev's)
  is shifted by mu, from the image's token count (`set_schedule`); the sigmas it sits at are the shifted ones.

Any other scheduler class (inversion, inpainting-only, consistency samplers, base classes) is refused by
class, whatever name it was given.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from rcgdm.cli import InputError
from rcgdm.sampling.families import DIFFUSION_TYPES, FLOW_PREDICTION, Family


@dataclass(frozen=True)
class SchedulerSupport:
    """A supported scheduler class: where its noise level comes from and which model outputs it can step."""

    class_name: str
    noise: str  # "alphas", "sigmas" or "flow" (module docstring)
    prediction_types: tuple[str, ...] = DIFFUSION_TYPES


SCHEDULERS = {
    "pndm": SchedulerSupport("PNDMScheduler", "alphas", ("epsilon", "v_prediction")),
    "ddim": SchedulerSupport("DDIMScheduler", "alphas"),
    "ddpm": SchedulerSupport("DDPMScheduler", "alphas"),
    "euler": SchedulerSupport("EulerDiscreteScheduler", "sigmas"),
    "euler_a": SchedulerSupport("EulerAncestralDiscreteScheduler", "sigmas", ("epsilon", "v_prediction")),
    "heun": SchedulerSupport("HeunDiscreteScheduler", "sigmas"),
    "lms": SchedulerSupport("LMSDiscreteScheduler", "sigmas"),
    "dpm++": SchedulerSupport("DPMSolverMultistepScheduler", "sigmas"),
    "unipc": SchedulerSupport("UniPCMultistepScheduler", "sigmas"),
    "flow_euler": SchedulerSupport("FlowMatchEulerDiscreteScheduler", "flow", (FLOW_PREDICTION,)),
    "flow_heun": SchedulerSupport("FlowMatchHeunDiscreteScheduler", "flow", (FLOW_PREDICTION,)),
}
_BY_CLASS = {s.class_name: s for s in SCHEDULERS.values()}
# Particles step ancestrally (rcgdm/sampling/particles.py): diffusers' two stochastic samplers, whose step is that ancestral
# step, and for flow models flow_euler's schedule
PARTICLE_SCHEDULERS = ("ddpm", "euler_a", "flow_euler")
EXPECTED = f"one of {', '.join(SCHEDULERS)} (or their class names)"


def scheduler_support(name: str) -> SchedulerSupport:
    """The supported sampler that a short name or a class name stands for, else UserError."""
    support = SCHEDULERS.get(name.lower()) or _BY_CLASS.get(name)
    if support is None:
        import diffusers

        known = name and isinstance(getattr(diffusers, name, None), type)
        what = "is not a text-to-image sampler the guidance is exact for" if known else "is unknown"
        raise InputError("scheduler", f"{name!r} {what}; expected {EXPECTED}")
    return support


def check_steps(name: str, prediction_type: str) -> SchedulerSupport:
    """UserError unless scheduler `name` is supported and can step a model that predicts `prediction_type`."""
    support = scheduler_support(name)
    if prediction_type not in support.prediction_types:
        expected = ", ".join(s for s, v in SCHEDULERS.items() if prediction_type in v.prediction_types)
        raise InputError("scheduler", f"{name!r} ({support.class_name}) cannot step a model that predicts {prediction_type!r}; "
                        f"expected one of {expected}")
    return support


def check_particle_scheduler(name: str) -> None:
    """InputError unless scheduler `name` can step particles (PARTICLE_SCHEDULERS)."""
    if scheduler_support(name).class_name not in {SCHEDULERS[k].class_name for k in PARTICLE_SCHEDULERS}:
        raise InputError("scheduler", f"{name!r} steps deterministically, and particles need a stochastic step; expected "
                                      "ddpm or euler_a (diffusion models), or flow_euler (flow models, stepped ancestrally)")


def make_scheduler(name: str, config, prediction_type: str | None = None):
    """The scheduler `name` built from a model's scheduler `config` for a model predicting `prediction_type` (default:
    the config's), refused in one line if it cannot step that type, or if the config leaves the schedules the guidance
    is exact for: flow-matching sigmas on a diffusion sampler, or stochastic flow sampling."""
    import diffusers

    support = check_steps(name, prediction_type or config.get("prediction_type", "epsilon"))
    check_schedule(name, support, config)
    if support.class_name == "PNDMScheduler" and "skip_prk_steps" not in config:
        config = {**config, "skip_prk_steps": True}  # what every stock SD config sets: no Runge-Kutta warm-up
    try:
        return getattr(diffusers, support.class_name).from_config(config)
    except Exception as err:  # a config option this class cannot take, or one needing a package not installed
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError("scheduler", f"{name!r} cannot be built from the model's scheduler config ({reason})") from None


def check_schedule(name: str, support: SchedulerSupport, config) -> None:
    """InputError if a scheduler `config` leaves the schedules the guidance is exact for: flow-matching sigmas on a
    diffusion sampler, or stochastic flow sampling."""
    if support.noise != "flow" and config.get("use_flow_sigmas"):
        raise InputError("scheduler", f"{name!r}: the model's scheduler config uses flow-matching sigmas; expected a "
                        "diffusion (alpha_bar) schedule")
    if support.noise == "flow" and config.get("stochastic_sampling"):
        raise InputError("scheduler", f"{name!r}: the model's scheduler config sets stochastic_sampling; expected a "
                        "deterministic flow schedule")


def dynamic_shift(config, tokens: int, family: Family) -> float:
    """mu of a flow schedule with dynamic shifting for an image of `tokens` transformer tokens: linear from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (the config's, else the family pipeline's defaults)."""
    low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", family.max_shift)
    return base + (top - base) * (tokens - low) / (high - low)


def token_count(latent_size: tuple[int, int], patch: int) -> int:
    """How many transformer tokens latents of `latent_size` (h, w) make, in patches of patch x patch."""
    return (latent_size[0] // patch) * (latent_size[1] // patch)


def schedule_options(scheduler, steps: int, family: Family, tokens: int) -> dict:
    """What the family's stock pipeline passes to scheduler.set_timesteps for `steps` steps and an image of `tokens`
    transformer tokens: FLUX's sigmas linspace(1, 1/steps, steps) (unless the config asks for flow sigmas), and mu for a
    schedule with dynamic shifting (`dynamic_shift`). InputError if the scheduler cannot take them."""
    options = {}
    if family.packed and not scheduler.config.get("use_flow_sigmas"):
        options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if scheduler.config.get("use_dynamic_shifting"):
        options["mu"] = dynamic_shift(scheduler.config, tokens, family)
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    for option in options:
        if option not in accepted:
            raise InputError("scheduler", f"{type(scheduler).__name__} takes no {option!r}, which {family.label}'s schedule "
                                          "needs (dynamic shifting or custom sigmas); expected flow_euler")
    return options


def set_schedule(scheduler, steps: int, family: Family, tokens: int, device: torch.device | None = None) -> None:
    """scheduler.set_timesteps for `steps` steps as the family's stock pipeline calls it (`schedule_options`)."""
    scheduler.set_timesteps(steps, device=device, **schedule_options(scheduler, steps, family, tokens))


def check_step_count(scheduler, steps: int, family: Family, tokens: int) -> None:
    """InputError unless `scheduler` can make the family's schedule of `steps` steps for an image of `tokens` tokens
    (`set_schedule`; PNDM's Runge-Kutta warm-up, when its config keeps it, needs at least 4). Tried on a copy: the
    scheduler itself is left as it was."""
    options = schedule_options(scheduler, steps, family, tokens)
    try:
        copy.deepcopy(scheduler).set_timesteps(steps, **options)
    except Exception as err:  # diffusers' own check, or an arithmetic failure on a schedule too short
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        warm_up = isinstance(scheduler, _class("pndm")) and not scheduler.config.get("skip_prk_steps")
        need = "at least 4 steps for PNDM's Runge-Kutta warm-up" if warm_up else "another number of steps"
        raise InputError("num_inference_steps", f"{steps} is too few for {type(scheduler).__name__} ({reason}); "
                                                f"expected {need}") from None


def _class(name: str) -> type:
    import diffusers

    return getattr(diffusers, SCHEDULERS[name].class_name)


def noise_levels(scheduler) -> torch.Tensor:
    """The noise level at each entry of `scheduler.timesteps` (after set_timesteps), as the scheduler's step treats its
    model input: alpha_bar, or sigma for a flow sampler; float64 (steps,) on the CPU. See the module docstring."""
    support = _BY_CLASS[type(scheduler).__name__]
    steps = len(scheduler.timesteps)
    if support.noise == "flow":
        return scheduler.sigmas[:steps].detach().cpu().double()
    if support.noise == "sigmas":
        sigma = scheduler.sigmas[:steps].detach().cpu().double()
        return 1 / (1 + sigma**2)  # sigma = inf (zero terminal SNR) gives 0
    return scheduler.alphas_cumprod.detach().cpu().double()[scheduler.timesteps.detach().cpu().long()]


def step_position(scheduler, timestep: torch.Tensor) -> int | None:
    """The entry of `scheduler.timesteps` that its next step() takes, as the scheduler finds it itself: its step index,
    else its begin index, else the entry of `timestep` (a scheduler timestep, not FLUX's thousandths); None if none
    holds it."""
    for position in (getattr(scheduler, "step_index", None), getattr(scheduler, "begin_index", None)):
        if position is not None:
            return position
    if hasattr(scheduler, "index_for_timestep"):
        try:
            return scheduler.index_for_timestep(timestep)
        except IndexError:  # diffusers' own lookup finds no entry (some schedulers return the last one instead)
            return None
    matches = (scheduler.timesteps == timestep.to(scheduler.timesteps.device)).nonzero()  # alpha samplers: t names it
    return int(matches[0, 0]) if len(matches) else None


def next_levels(scheduler) -> torch.Tensor:
    """The noise level each step of `scheduler` lands at: the next entry's, and the clean data's after the last
    (alpha_bar 1, or sigma 0 for a flow sampler); float64 (steps,) on the CPU. As DDPM's and Euler ancestral's own
    steps land (`noise_levels`' docstring: schedules without repeated timesteps)."""
    clean = torch.tensor([0.0 if is_flow(scheduler) else 1.0], dtype=torch.float64)
    return torch.cat([noise_levels(scheduler)[1:], clean])


def is_flow(scheduler) -> bool:
    """Whether `scheduler` (an instance) is a flow-matching sampler."""
    support = _BY_CLASS.get(type(scheduler).__name__)
    return support is not None and support.noise == "flow"
