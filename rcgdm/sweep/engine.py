"""Sampling a sweep: each distinct image once (plan.draws), best-of-N per combination, a row per image written
after every batch (resume.ResumeLog), the batches split between processes under a launcher (rcgdm/distributed.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from rcgdm import distributed
from rcgdm.cli import UserError
from rcgdm.files.png import save_png
from rcgdm.memory import PeakMemory
from rcgdm.pipeline import RewardDirectedPipeline, Sampling, Scored, best_of_n
from rcgdm.sweep.auto import AUTO, AutoChoice, choose_guidance
from rcgdm.sweep.plan import Combo, Draw, draws
from rcgdm.sweep.resume import ResumeLog, auto_key
from rcgdm.sweep.rows import combo_key, image_name, image_row, unique_rows


@dataclass(frozen=True)
class SweepStats:
    """Per combination of a sweep: sampling seconds (work shared by several combinations counts to each in equal
    parts; an auto combination's pilot included), the peak memory while its images were sampled (bytes: CUDA peak
    allocation, or peak RSS on the CPU; the highest over processes; None when this run sampled none of them, as a
    resumed run that had them), and the strength `--guidance auto` chose (None for a fixed strength)."""

    seconds: list[float]
    peak_memory_bytes: list[int | None]
    auto: list[AutoChoice | None]


@dataclass(frozen=True)
class SweepSettings:
    """What every combination of a sweep samples with."""

    num_images: int
    batch_size: int
    num_inference_steps: int
    cfg: float
    height: int | None = None
    width: int | None = None
    batch_mean: bool = False
    grad_path: str = "xt"
    auto_tolerance: float = 0.0  # how close a pilot of --guidance auto must come to the target (rcgdm/sweep/auto.py)
    distilled_guidance: float | None = None  # FLUX.1-dev's guidance embedding (None: the family's)
    particles: int = 1  # per guided image (rcgdm/sampling/particles.py), denoised batch_size at a time

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.num_inference_steps, self.cfg, self.height, self.width, self.distilled_guidance,
                        self.particles, self.batch_size)


def run_sweep(pipe: RewardDirectedPipeline, settings: SweepSettings, combos: list[Combo], out_dir: Path, log: ResumeLog,
              state: PartialState) -> tuple[list[dict], SweepStats]:
    """Sample this process's share of the batches into `out_dir` (the combinations' folders lie in it), skipping those
    `log` holds -> (every row of the run, gathered from all processes; seconds, memory and auto choices per combination).
    An auto combination's strength is searched first (rcgdm/sweep/auto.py), by each process for its own share."""
    batches = distributed.batches(settings.num_images, settings.batch_size)
    units = [(draw, indices) for draw in draws(combos) for indices in batches]
    mine = distributed.my_share(units, state)
    todo = [(draw, indices) for draw, indices in mine if not all(log.finished(c.key(), i) for c in draw.combos for i in indices)]
    seconds, peaks, auto = [0.0] * len(combos), [None] * len(combos), [None] * len(combos)
    device = pipe.base._execution_device
    chosen = {}  # the strength of each auto draw of this process's share, searched once (deterministic: same in each)
    for draw in dict.fromkeys(draw for draw, _ in mine if draw.guidance == AUTO):
        start, key = time.perf_counter(), auto_key(draw.prompt, draw.target)
        if key in log.auto:  # an interrupted run chose it: the same strength for all its images
            chosen[draw] = AutoChoice.from_summary(log.auto[key])
        else:
            chosen[draw] = choose_guidance(pipe, settings, draw.prompt, draw.target, log.seed, settings.auto_tolerance)
            log.record_auto(key, chosen[draw].summary())
        for combo in draw.combos:
            seconds[combos.index(combo)] += (time.perf_counter() - start) / len(draw.combos)
            auto[combos.index(combo)] = chosen[draw]
    desc = "images" if state.num_processes == 1 else f"images (process 0 of {state.num_processes})"
    total, left = (sum(len(indices) * len(draw.combos) for draw, indices in part) for part in (mine, todo))
    with tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not state.is_main_process) as bar:
        for draw, indices in todo:
            start = time.perf_counter()
            choice = chosen.get(draw)
            strength = draw.guidance if choice is None else choice.guidance
            with PeakMemory(device, interval=0.01) as memory:
                best = sample_draw(pipe, settings, draw, strength, log.seed, indices)
            steps = len(pipe.base.scheduler.timesteps)  # one batched UNet call per step covers both CFG branches
            particles = settings.particles if settings.sampling.with_particles(strength) else 1
            cost = Cost(steps, 0 if choice is None else choice.unet_calls / settings.num_images, particles)
            rows = [row for combo in draw.combos
                    for row in save_images(combo, indices, log.seed, out_dir, best[combo], strength, cost)]
            log.add([row for row in rows if not log.finished(combo_key(row), row["image"])])
            for combo in draw.combos:
                k = combos.index(combo)
                seconds[k] += (time.perf_counter() - start) / len(draw.combos)
                peaks[k] = max(peaks[k] or 0, memory.peak)
            bar.update(len(indices) * len(draw.combos))
    every = gather_object([(seconds, peaks, auto)])
    stats = SweepStats([sum(s[k] for s, _, _ in every) for k in range(len(combos))],
                       [max((p[k] for _, p, _ in every if p[k] is not None), default=None) for k in range(len(combos))],
                       [next((a[k] for _, _, a in every if a[k] is not None), None) for k in range(len(combos))])
    return unique_rows(gather_object(log.rows)), stats


def sample_draw(pipe: RewardDirectedPipeline, settings: SweepSettings, draw: Draw, strength: float | str, seed: int,
                indices: range) -> dict[Combo, Scored]:
    """Images `indices` of every combination of `draw`, guided with `strength` (the draw's, or what auto chose):
    candidates 0 .. N-1 sampled once, and per combination (best of N, target T) the candidate of its first N whose
    predicted reward is closest to T (candidate 0: the plain image)."""
    s = settings
    steer = pipe.predictor.steer(draw.target, strength, s.batch_mean, s.grad_path)
    candidates = (pipe.sample(draw.prompt, steer, seed, indices, s.sampling, k) for k in range(draw.candidates))
    return best_of_n(candidates, {combo: (combo.target, combo.best_of) for combo in draw.combos})


@dataclass(frozen=True)
class Cost:
    """UNet calls per image: of one sample (steps, for each of its particles), and an auto combination's share of its
    pilot."""

    steps: int
    pilot_per_image: float
    particles: int = 1


def save_images(combo: Combo, indices: range, seed: int, out_dir: Path, scored: Scored, strength: float,
                cost: Cost) -> list[dict]:
    """Write a batch's images as {idx}_gt_{gt}_pred_{pred}.png in the combination's folder -> their rows."""
    rows = []
    for j, i in enumerate(indices):
        gt, pred = scored.rewards[j].item(), scored.predicted_rewards[j].item()
        path = combo.folder / image_name(i, gt, pred)
        save_png(scored.images[j], path)
        shift = None if scored.shift is None else scored.shift[j].item()
        file = path.relative_to(out_dir).as_posix()
        ess = None if scored.ess is None else [round(v, 4) for v in scored.ess[j].tolist()]
        calls = combo.best_of * cost.steps * cost.particles
        rows.append(image_row(combo.key(), i, seed, gt, pred, shift, calls, file, strength, cost.pilot_per_image,
                              cost.particles, ess))
    return rows


def unguided_first_images(pipe: RewardDirectedPipeline, settings: SweepSettings, combos: list[Combo],
                          seed: int) -> dict[str, tuple[torch.Tensor, float, float]]:
    """Image 0 of every prompt the sweep samples at no guidance 0, unguided, as (image (3, H, W), gt, pred): the
    grid's first column needs it."""
    out, s = {}, settings
    sampled_unguided = {c.prompt for c in combos if c.guidance == 0}  # ("auto" may choose 0, but on its own images)
    for prompt in dict.fromkeys(c.prompt for c in combos if c.prompt not in sampled_unguided):
        scored = pipe.sample(prompt, None, seed, [0], s.sampling)
        out[prompt] = (scored.images[0], scored.rewards.item(), scored.predicted_rewards.item())
    return out


def check_images_visible(out_dir: Path, rows: list[dict]) -> None:
    """The main process reads the images back for grid.png: every process must have written them where it can see them."""
    missing = [row["file"] for row in rows if not (out_dir / row["file"]).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} images (first {missing[0]!r}) are not in --out_dir {str(out_dir)!r} as the main process sees it; "
            "with several machines, --out_dir must be on a filesystem they share"
        )
