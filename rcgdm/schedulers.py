"""The samplers the guidance is exact for, and the noise level each one sits at, step by step.

The paper's term is scaled by alpha_bar at the current step (rcgdm/guidance.py). Two kinds of
diffusers scheduler place their steps differently:

- "alphas" (PNDM, DDIM, DDPM) step on integer training timesteps: alpha_bar = alphas_cumprod[t].
- "sigmas" (Euler, Euler ancestral, Heun, LMS, DPM++, UniPC) step on a sigma schedule that need not
  sit on a training timestep (Karras, exponential or beta sigmas; Euler's continuous timesteps, where
  t is 0.25 log sigma). Their model input is the latent scaled to the variance-preserving form, so
  x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = 1 / (1 + sigma_i^2), sigma_i = scheduler.sigmas[i] for
  the i-th entry of scheduler.timesteps (Heun repeats timesteps and sigmas alike).
- "flow" (flow-matching Euler and Heun, for SD3) step on sigmas of x_t = (1 - sigma) x0 + sigma eps, and the
  level is sigma_i = scheduler.sigmas[i] itself (= timesteps[i] / num_train_timesteps); they step only a
  velocity-predicting model, and the diffusion samplers only the others.

Any other scheduler class (inversion, inpainting-only, consistency samplers, base classes) is refused by
class, whatever name it was given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rcgdm.cli import InputError
from rcgdm.families import DIFFUSION_TYPES, FLOW_PREDICTION


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


def make_scheduler(name: str, config, prediction_type: str | None = None):
    """The scheduler `name` built from a model's scheduler `config` for a model predicting `prediction_type` (default:
    the config's), refused in one line if it cannot step that type, or if the config leaves the schedules the guidance
    is exact for: flow-matching sigmas on a diffusion sampler, or resolution-dependent (dynamic) or stochastic flow
    sigmas."""
    import diffusers

    support = check_steps(name, prediction_type or config.get("prediction_type", "epsilon"))
    if support.noise != "flow" and config.get("use_flow_sigmas"):
        raise InputError("scheduler", f"{name!r}: the model's scheduler config uses flow-matching sigmas; expected a "
                        "diffusion (alpha_bar) schedule")
    for option in ("use_dynamic_shifting", "stochastic_sampling") if support.noise == "flow" else ():
        if config.get(option):
            raise InputError("scheduler", f"{name!r}: the model's scheduler config sets {option}; expected a fixed, "
                            "deterministic flow schedule (shift only)")
    try:
        return getattr(diffusers, support.class_name).from_config(config)
    except Exception as err:  # a config option this class cannot take, or one needing a package not installed
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError("scheduler", f"{name!r} cannot be built from the model's scheduler config ({reason})") from None


def check_step_count(scheduler, steps: int) -> None:
    """InputError unless `scheduler` can make a schedule of `steps` steps (PNDM's Runge-Kutta warm-up, when its config
    keeps it, needs at least 4). Tried on a copy: the scheduler itself is left as it was."""
    try:
        copy.deepcopy(scheduler).set_timesteps(steps)
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


def is_flow(scheduler) -> bool:
    """Whether `scheduler` (an instance) is a flow-matching sampler."""
    support = _BY_CLASS.get(type(scheduler).__name__)
    return support is not None and support.noise == "flow"
