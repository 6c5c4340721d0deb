"""The report of a sweep, from its rows and images: per-combination summaries (printed and in summary.json), results.csv,
the figures (drawn by plots.py: reward_vs_target, shift_vs_target, reward_vs_compute, reward_vs_distance) and grid.png.

Per combination, beside the rewards: calibration (target error: mean ground truth minus target; predictor gap: mean
prediction minus mean ground truth on the same images, which grows when the predictor is being exploited), what
the images lost or moved against the unguided images of the same prompt (diversity ratio, MMD^2 with its standard
error: rcgdm/image_distances.py; None without a guidance-0 combination of that prompt), and the cost per image (seconds,
UNet calls, peak memory of the sampling)."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import torch

from rcgdm import plots
from rcgdm.files.atomic import save_json, save_text
from rcgdm.files.png import load_png
from rcgdm.image_distances import diversity, image_features, median_bandwidth, mmd2
from rcgdm.sampling.guidance import guidance_label
from rcgdm.sweep.auto import MAX_GUIDANCE
from rcgdm.sweep.engine import SweepStats
from rcgdm.sweep.outputs import REPORT_FILES
from rcgdm.sweep.plan import Combo
from rcgdm.sweep.rows import COLUMNS, combo_key


def write_report(out_dir: Path, combos: list[Combo], rows: list[dict], stats: SweepStats, record: dict,
                 unguided: dict[str, tuple]) -> tuple[list[dict], list[str]]:
    """Write the run's files into `out_dir` and print a line per combination -> (the per-combination summaries, the
    names of the files written). `record` goes into summary.json beside the summaries (settings, provenance,
    versions); `unguided` holds (image, gt, pred) of image 0 of each prompt the sweep has no guidance 0 for (the
    grid's first column)."""
    written = []

    def out(name: str) -> Path:
        assert name in REPORT_FILES, name  # the run folder knows the report's files by this list
        written.append(name)
        return out_dir / name

    order = {combo.key(): n for n, combo in enumerate(combos)}
    rows = sorted(rows, key=lambda r: (order[combo_key(r)], r["image"]))
    summary = summarise(combos, rows, stats)
    add_image_measures(out_dir, rows, summary)
    write_csv(rows, out("results.csv"))
    plots.reward_vs_target(summary, out("reward_vs_target.png"))
    plots.shift_vs_target(summary, out("shift_vs_target.png"))
    plots.reward_vs_compute(summary, out("reward_vs_compute.png"))
    plots.reward_vs_distance(summary, out("reward_vs_distance.png"))
    plots.ess_per_step(summary, out("ess_per_step.png"))
    write_grid(out_dir, combos, rows, unguided, out("grid.png"))
    save_json({"settings": record["settings"], "combinations": summary, **{k: v for k, v in record.items() if k != "settings"}},
              out("summary.json"))
    for c in summary:
        print(
            f"target {c['target']:g}, guidance {guidance_label(c['guidance'])}" + _auto(c["auto"])
            + (f", best of {c['best_of']}" if c["best_of"] > 1 else "") + _particles(c) + f", {c['prompt']!r}: "
            f"ground truth {c['gt_mean']:.4f} ± {c['gt_std']:.4f}, predicted {c['pred_mean']:.4f} ± {c['pred_std']:.4f}; "
            f"target error {c['target_error']:+.4f}, predictor gap {c['predictor_gap']:+.4f}" + _versus_unguided(c)
        )
    return summary, [name for name in written if (out_dir / name).is_file()]


def _auto(choice: dict | None) -> str:
    if choice is None:
        return ""
    if choice["reached"]:
        return f" (chose {choice['chosen_guidance']:g}; pilot {choice['pilot_unet_calls']} UNet calls)"
    return (f" (UNREACHABLE up to guidance {MAX_GUIDANCE:g}: closest pilot prediction {choice['pilot_predicted']:.4f} at "
            f"{choice['chosen_guidance']:g}, used)")


def _particles(c: dict) -> str:
    if c["ess_per_step"] is None:
        return ""
    return (f", {c['particles']} particles ({c['unet_calls']:g} UNet calls per image; effective share lowest "
            f"{min(c['ess_per_step'][:-1]):.2f} over the steps, {c['final_ess']:.2f} after the final weight)")


def _versus_unguided(c: dict) -> str:
    if c["mmd_to_unguided"] is None:
        return ""
    return (f", diversity {c['diversity_vs_unguided']:.2f}x unguided, MMD^2 to unguided {c['mmd_to_unguided']:.4f} "
            f"± {c['mmd_to_unguided_se']:.4f}")


def summarise(combos: list[Combo], rows: list[dict], stats: SweepStats) -> list[dict]:
    """Per combination: rewards (mean, std, distance to target), calibration, distribution shift, compute, time, memory."""
    out = []
    for combo, combo_seconds, peak, choice in zip(combos, stats.seconds, stats.peak_memory_bytes, stats.auto, strict=True):
        mine = [r for r in rows if combo_key(r) == combo.key()]
        gt, pred = torch.tensor([r["gt"] for r in mine]), torch.tensor([r["pred"] for r in mine])
        shifts = [r.get("shift") for r in mine]
        shift = None if None in shifts else torch.tensor(shifts)
        out.append(
            {
                "prompt": combo.prompt,
                "target": combo.target,
                "guidance": combo.guidance,
                "best_of": combo.best_of,
                "n": len(mine),
                "guidance_used": mine[0]["guidance_used"],
                "auto": None if choice is None else choice.summary(),
                "unet_calls": sum(r["unet_calls"] for r in mine) / len(mine),
                "unet_calls_with_pilot": sum(r["unet_calls"] + r["pilot_unet_calls"] for r in mine) / len(mine),
                "gt_distance": (gt - combo.target).abs().mean().item(),
                "target_error": gt.mean().item() - combo.target,
                "abs_target_error": abs(gt.mean().item() - combo.target),
                "predictor_gap": pred.mean().item() - gt.mean().item(),
                "gt_mean": gt.mean().item(),
                "gt_std": gt.std(correction=0).item(),
                "pred_mean": pred.mean().item(),
                "pred_std": pred.std(correction=0).item(),
                "shift_mean": None if shift is None else shift.mean().item(),
                "shift_std": None if shift is None else shift.std(correction=0).item(),
                "folder": str(combo.folder),
                "sampling_seconds": combo_seconds,
                "seconds_per_image": combo_seconds / len(mine),
                "peak_memory_bytes": peak,
                **particle_summary(mine),
            }
        )
    for c in out:  # shift relative to the unguided images of the same prompt, when the run has them
        unguided = [u["shift_mean"] for u in out if u["prompt"] == c["prompt"] and u["guidance"] == 0 and u["best_of"] == 1]
        known = c["shift_mean"] is not None and unguided and None not in unguided
        c["shift_vs_unguided"] = c["shift_mean"] / (sum(unguided) / len(unguided)) if known else None
    return out


def particle_summary(rows: list[dict]) -> dict:
    """A combination's particles (rcgdm/sampling/particles.py) from its rows: K (1 without), and their effective share at each
    step and after the final weight, averaged over the images (None without particles)."""
    traces = [row.get("ess") for row in rows]
    if None in traces or not traces:
        return {"particles": 1, "ess_per_step": None, "final_ess": None}
    mean = torch.tensor(traces, dtype=torch.float64).mean(0).tolist()
    return {"particles": rows[0]["particles"], "ess_per_step": mean, "final_ess": mean[-1]}


def add_image_measures(out_dir: Path, rows: list[dict], summary: list[dict]) -> None:
    """Add to each combination's summary its images' diversity and, against the unguided images of its prompt (guidance
    0, best of 1; paired by image index), its diversity ratio and MMD^2 with standard error (rcgdm/image_distances.py)."""
    features = {}
    for c in summary:
        mine = [r for r in rows if combo_key(r) == combo_key(c)]
        features[combo_key(c)] = image_features(torch.stack([load_png(out_dir / r["file"]) for r in mine]))
    for c in summary:
        own = features[combo_key(c)]
        c["diversity"] = diversity(own)
        reference = next((u for u in summary if u["prompt"] == c["prompt"] and u["guidance"] == 0 and u["best_of"] == 1), None)
        unguided = None if reference is None else features[combo_key(reference)]
        bandwidth = None if unguided is None else median_bandwidth(unguided)
        measured = None if bandwidth is None or len(own) != len(unguided) else mmd2(own, unguided, bandwidth)
        spread = None if unguided is None else diversity(unguided)
        c["diversity_vs_unguided"] = c["diversity"] / spread if spread and c["diversity"] is not None else None
        c["mmd_to_unguided"], c["mmd_to_unguided_se"] = measured or (None, None)
        c["mmd_bandwidth"] = bandwidth


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    # rows read back from progress.json have their keys sorted; the per-step "ess" lists are summary.json's
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    save_text(buffer.getvalue(), path)


def write_grid(out_dir: Path, combos: list[Combo], rows: list[dict], unguided: dict[str, tuple], path: Path) -> None:
    """The paper's Figure 6 layout: rows = prompts, an unguided column, then one column per target at the run's
    strongest guidance (and first best-of-N); every cell is image 0 (as saved), so every cell starts from the same noise."""
    guided = [c.guidance for c in combos if c.guidance != 0]
    numbers = [g for g in guided if not isinstance(g, str)]
    strongest = max(numbers, key=abs) if numbers else guided[0] if guided else 0.0  # auto alone: its images
    targets = sorted({c.target for c in combos})
    prompts = list(dict.fromkeys(c.prompt for c in combos))
    shown = [r for r in rows if r["image"] == 0 and r["best_of"] == combos[0].best_of]
    first_images = {(r["prompt"], r["target"], r["guidance"]): r for r in shown}

    def cell(row: dict) -> tuple[torch.Tensor, float, float]:
        return load_png(out_dir / row["file"]), row["gt"], row["pred"]

    grid, captions = [], []
    for prompt in prompts:
        first = next((cell(r) for (p, _, g), r in first_images.items() if p == prompt and g == 0), None)
        if first is None:
            first = unguided[prompt]
        cells = [first] + [cell(first_images[(prompt, t, strongest)]) for t in targets]
        grid.append([image for image, _, _ in cells])
        captions.append([f"gt {gt:.3f} / pred {pred:.3f}" for _, gt, pred in cells])
    column_labels = ["unguided"] + [f"target {t:g}" for t in targets]
    row_labels = [textwrap.fill(prompt, 24) or "(unconditional)" for prompt in prompts]
    plots.image_grid(row_labels, column_labels, grid, captions, path)
    print(f"grid.png: guidance {guidance_label(strongest)}, image 0 of each combination")
