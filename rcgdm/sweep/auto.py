"""`--guidance auto`: per (prompt, target), the smallest strength whose short pilot reaches the target.

A pilot samples the run's first PILOT_IMAGES images (their seeds) with at most PILOT_STEPS denoising steps, and
scores them as the run does (the predictor on the VAE re-encoding). Its mean predicted reward *reaches* the target
when it lies within `tolerance` of it. The search:

1. strength 0: if the unguided pilot already reaches the target, the choice is 0;
2. bracketing: strengths START, 2 START, 4 START, ... up to MAX_GUIDANCE, until a pilot reaches the target or
   goes past it (the prediction crosses it);
3. refinement: REFINEMENTS steps of false position inside the bracket [last short, first reached or past]: the
   next strength is where the line through the bracket's two pilots meets the near half of the tolerance band
   (target - tolerance / 2 when approaching from below; kept 10% inside the bracket), and the bracket shrinks to
   the side that still holds the crossing;
4. the choice is the smallest strength whose pilot reached the target. When none did (the target lies beyond what
   MAX_GUIDANCE reaches, or the prediction jumps over the tolerance band), the target is reported unreachable and
   the run uses the strength whose pilot came closest.

With as many steps as the run (PILOT_STEPS or fewer), the pilot at the chosen strength *is* the run's first images:
it samples them in the run's batches (`--bs`), so that `--batch_mean_guidance` divides the term as the run does.
A pilot that diverges (NaN or inf) at a strength counts as past the target: that strength is too strong.

The pilot's cost (UNet calls, counted per image as the rows count them) is recorded with the choice. The search is
deterministic (fixed seeds), so a resumed run, or another process, makes the same choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rcgdm.cli import finite32
from rcgdm.distributed import batches
from rcgdm.pipeline import NonFiniteError
from rcgdm.sampling.guidance import RewardGuidance

PILOT_IMAGES = 4
PILOT_STEPS = 20
START, MAX_GUIDANCE, REFINEMENTS = 25.0, 1600.0, 3
AUTO = "auto"


@dataclass(frozen=True)
class AutoChoice:
    """The strength chosen for one (prompt, target), and what the search saw."""

    guidance: float
    reached: bool  # whether a pilot came within the tolerance
    predicted: float  # the pilot's mean predicted reward at that strength
    tolerance: float
    pilot: tuple[tuple[float, float | None], ...]  # (strength, pilot mean predicted reward; None: diverged), in order
    unet_calls: int  # the pilot's UNet calls, summed over its images

    def summary(self) -> dict:
        return {"chosen_guidance": self.guidance, "reached": self.reached, "pilot_predicted": self.predicted,
                "tolerance": self.tolerance, "pilot": [list(p) for p in self.pilot],
                "pilot_unet_calls": self.unet_calls}

    @classmethod
    def from_summary(cls, summary: dict) -> AutoChoice:
        """The choice `summary()` recorded (a resumed run reuses it); ValueError if it is not one."""
        try:
            pilot = tuple((float(g), None if p is None else float(p)) for g, p in summary["pilot"])
            choice = cls(float(summary["chosen_guidance"]), summary["reached"], float(summary["pilot_predicted"]),
                         float(summary["tolerance"]), pilot, int(summary["pilot_unet_calls"]))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"not a recorded choice ({type(err).__name__})") from None
        if not isinstance(choice.reached, bool) or not all(map(finite32, (choice.guidance, choice.predicted))):
            raise ValueError("not a recorded choice")
        return choice


def choose_guidance(pipe, settings, prompt: str, target: float, seed: int, tolerance: float) -> AutoChoice:
    """Search the strength for `target` under `prompt` (module docstring); `settings`: the sweep's (SweepSettings)."""
    tried: dict[float, float] = {}
    calls = 0

    def pilot(guidance: float) -> float:
        nonlocal calls
        steer = None if guidance == 0 else RewardGuidance(pipe.predictor.net, target, guidance, settings.batch_mean,
                                                          settings.grad_path)
        sampling = replace(settings.sampling, num_inference_steps=min(PILOT_STEPS, settings.num_inference_steps))
        predicted = []
        for indices in batches(min(PILOT_IMAGES, settings.num_images), settings.batch_size):  # the run's batches
            try:
                scored = pipe.sample(prompt, steer, seed, indices, sampling, progress_bar=False)
            except NonFiniteError:
                if guidance == 0:
                    raise  # the model itself diverges: no strength can help
                scored = None
            calls += len(indices) * len(pipe.base.scheduler.timesteps)
            if scored is None:
                tried[guidance] = math.nan
                return tried[guidance]
            predicted.append(scored.predicted_rewards)
        tried[guidance] = torch.cat(predicted).mean().item()  # float32, as the run's own mean
        return tried[guidance]

    side = 1.0 if target > pilot(0.0) else -1.0

    def reached(guidance: float) -> bool:
        return abs(tried[guidance] - target) <= tolerance

    def reached_or_past(guidance: float) -> bool:  # a diverged pilot is past: too strong
        return reached(guidance) or math.isnan(tried[guidance]) or (tried[guidance] - target) * side > 0

    low, high, strength = 0.0, None, START
    while not reached(0.0) and strength <= MAX_GUIDANCE:
        pilot(strength)
        if reached_or_past(strength):
            high = strength
            break
        low, strength = strength, 2 * strength
    for _ in range(REFINEMENTS if high is not None else 0):
        rise, aim = tried[high] - tried[low], target - side * tolerance / 2  # inside the band, on the near side
        step = (aim - tried[low]) / rise if rise * side > 0 else 0.5
        guess = low + min(max(step, 0.1), 0.9) * (high - low)
        pilot(guess)
        low, high = (low, guess) if reached_or_past(guess) else (guess, high)
    within = [g for g in tried if reached(g)]
    finite = [g for g in tried if not math.isnan(tried[g])]  # strength 0 at least
    chosen = min(within) if within else min(finite, key=lambda g: abs(tried[g] - target))
    pilot_record = tuple((g, None if math.isnan(p) else p) for g, p in tried.items())
    return AutoChoice(chosen, bool(within), tried[chosen], tolerance, pilot_record, calls)
