"""The report of a sweep, from its rows: per-combination summaries (printed and in summary.json), results.csv,
the figures (drawn by plots.py: reward_vs_target, shift_vs_target, reward_vs_compute) and grid.png."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import torch

from rcgdm import plots
from rcgdm.files.atomic import save_json, save_text
from rcgdm.files.png import load_png
from rcgdm.sweep.plan import Combo
from rcgdm.sweep.rows import COLUMNS, combo_key


def write_report(out_dir: Path, combos: list[Combo], rows: list[dict], seconds: list[float], record: dict,
                 unguided: dict[str, tuple]) -> list[dict]:  # fmt: skip
    """Write the run's files into `out_dir` and print a line per combination -> the per-combination summaries.
    `record` goes into summary.json beside the summaries (settings, provenance, versions); `unguided` holds (image, gt,
    pred) of image 0 of each prompt the sweep has no guidance 0 for (the grid's first column)."""
    order = {combo.key(): n for n, combo in enumerate(combos)}
    rows = sorted(rows, key=lambda r: (order[combo_key(r)], r["image"]))
    summary = summarise(combos, rows, seconds)
    write_csv(rows, out_dir / "results.csv")
    plots.reward_vs_target(summary, out_dir / "reward_vs_target.png")
    plots.shift_vs_target(summary, out_dir / "shift_vs_target.png")
    plots.reward_vs_compute(summary, out_dir / "reward_vs_compute.png")
    write_grid(out_dir, combos, rows, unguided, out_dir / "grid.png")
    save_json({"settings": record["settings"], "combinations": summary, **{k: v for k, v in record.items() if k != "settings"}},
              out_dir / "summary.json")  # fmt: skip
    for c in summary:
        print(
            f"target {c['target']:g}, guidance {c['guidance']:g}" + (f", best of {c['best_of']}" if c["best_of"] > 1 else "")
            + f", {c['prompt']!r}: "
            f"ground truth {c['gt_mean']:.4f} ± {c['gt_std']:.4f}, predicted {c['pred_mean']:.4f} ± {c['pred_std']:.4f}"
        )
    return summary


def summarise(combos: list[Combo], rows: list[dict], seconds: list[float]) -> list[dict]:
    """Per combination: rewards (mean, std, distance to target), distribution shift, compute and time."""
    out = []
    for combo, combo_seconds in zip(combos, seconds, strict=True):
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
                "unet_calls": sum(r["unet_calls"] for r in mine) / len(mine),
                "gt_distance": (gt - combo.target).abs().mean().item(),
                "gt_mean": gt.mean().item(),
                "gt_std": gt.std(correction=0).item(),
                "pred_mean": pred.mean().item(),
                "pred_std": pred.std(correction=0).item(),
                "shift_mean": None if shift is None else shift.mean().item(),
                "shift_std": None if shift is None else shift.std(correction=0).item(),
                "folder": str(combo.folder),
                "sampling_seconds": combo_seconds,
            }
        )
    for c in out:  # shift relative to the unguided images of the same prompt, when the run has them
        unguided = [u["shift_mean"] for u in out if u["prompt"] == c["prompt"] and u["guidance"] == 0 and u["best_of"] == 1]
        known = c["shift_mean"] is not None and unguided and None not in unguided
        c["shift_vs_unguided"] = c["shift_mean"] / (sum(unguided) / len(unguided)) if known else None
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)  # rows read back from progress.json have their keys sorted
    writer.writeheader()
    writer.writerows(rows)
    save_text(buffer.getvalue(), path)


def write_grid(out_dir: Path, combos: list[Combo], rows: list[dict], unguided: dict[str, tuple], path: Path) -> None:
    """The paper's Figure 6 layout: rows = prompts, an unguided column, then one column per target at the run's
    strongest guidance (and first best-of-N); every cell is image 0 (as saved), so every cell starts from the same noise."""
    strongest = max((c.guidance for c in combos), key=abs)
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
    print(f"grid.png: guidance {strongest:g}, image 0 of each combination")
