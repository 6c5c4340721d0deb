"""The numbers the demo reports, read from what its runs wrote: training against the baseline, the paper's effect
per prompt, the strengths compared (fixed, auto, posterior), the theory's E[r | y = a], the prompts' colours."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

LABELS = "cifar10_outputs_with_noise.npy"


def training_numbers(folder: Path, stem: str = "convnet") -> dict:
    """Validation loss over all timesteps and on the least noisy bucket, as fractions of predict-the-mean."""
    summary = json.loads((folder / f"{stem}.train_summary.json").read_text())
    baseline = summary["baseline_val_loss"]
    lowest = next(iter(summary["final_val_loss_by_noise"].values()))
    return {"val_vs_baseline": summary["final_val_loss"] / baseline,
            "lowest_noise_val_vs_baseline": None if lowest is None else lowest / baseline}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation; None where it is undefined (fewer than two points, or a constant side)."""
    rx, ry = (np.argsort(np.argsort(v)).astype(float) for v in (xs, ys))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(xs) > 1 and rx.std() > 0 and ry.std() > 0 else None


def effect_numbers(sweep: Path, mean: float, std: float, guidance: float, prompt: str = "") -> dict:
    """The paper's effect for one prompt, in label std: per-target mean ground truth at `guidance`, its
    Spearman against the target, top minus bottom, the unguided mean's offset, and the largest shift."""
    combos = [c for c in json.loads((sweep / "summary.json").read_text())["combinations"] if c["prompt"] == prompt]

    def pooled(rows: list[dict], key: str) -> float:
        return sum(c[key] * c["n"] for c in rows) / sum(c["n"] for c in rows)

    ts = sorted({c["target"] for c in combos})
    guided = [pooled([c for c in combos if c["target"] == t and c["guidance"] == guidance], "gt_mean") for t in ts]
    unguided = pooled([c for c in combos if c["guidance"] == 0], "gt_mean")
    shifts = [c["shift_vs_unguided"] for c in combos if c["guidance"] == guidance and c["shift_vs_unguided"] is not None]
    return {
        "guidance": guidance,
        "targets": ts,
        "gt_mean_per_target": guided,
        "spearman": spearman(ts, guided),
        "top_minus_bottom_in_label_std": (guided[-1] - guided[0]) / std,
        "unguided_offset_in_label_std": (unguided - mean) / std,
        "max_shift_vs_unguided": max(shifts, default=None),
    }


def methods_compared(sweep: Path, std: float, guidance: float, prompt: str, names: tuple[str, ...] | None = None) -> dict:
    """For one prompt, the fixed `guidance` beside `--guidance auto` and `posterior` (or the strengths `names`), over the
    sweep's targets: the
    ground truth per target, mean |ground truth - target|, mean MMD^2 to the unguided images, the ground truth's spread
    across targets (max - min, in label std), total UNet calls of the images (and of auto's pilots), and how many
    targets auto reported unreachable."""
    combos = [c for c in json.loads((sweep / "summary.json").read_text())["combinations"] if c["prompt"] == prompt]
    out = {}
    for name in names or (f"{guidance:g}", "auto", "posterior"):
        mine = sorted((c for c in combos if c["guidance"] == (guidance if name[0].isdigit() else name)),
                      key=lambda c: c["target"])
        gt = [c["gt_mean"] for c in mine]
        out[name] = {
            "gt_mean_per_target": gt,
            "mean_abs_target_error": float(np.mean([c["abs_target_error"] for c in mine])),
            "mean_mmd_to_unguided": _mean([c["mmd_to_unguided"] for c in mine]),
            "gt_spread_in_label_std": (max(gt) - min(gt)) / std,
            "unet_calls": sum(c["unet_calls_with_pilot"] * c["n"] for c in mine),
            "unreachable": sum(1 for c in mine if c["auto"] is not None and not c["auto"]["reached"]),
            "chosen_guidance": [None if c["auto"] is None else c["auto"]["chosen_guidance"] for c in mine],
        }
    return out


def calibrated_numbers(sweep: Path, std: float, training: Path) -> dict:
    """The calibrated predictor's `--guidance posterior` on the prompt "" (`methods_compared`'s numbers, with the predicted
    reward per target beside the ground truth), and its calibration by noise level: the variance it predicted over
    the squared error it made, on validation (`training`: its train_summary.json)."""
    combos = [c for c in json.loads((sweep / "summary.json").read_text())["combinations"] if c["guidance"] == "posterior"]
    mine = sorted(combos, key=lambda c: c["target"])
    gt = [c["gt_mean"] for c in mine]
    return {"gt_mean_per_target": gt, "predicted_mean_per_target": [c["pred_mean"] for c in mine],
            "mean_abs_target_error": float(np.mean([c["abs_target_error"] for c in mine])),
            "mean_mmd_to_unguided": _mean([c["mmd_to_unguided"] for c in mine]),
            "gt_spread_in_label_std": (max(gt) - min(gt)) / std,
            "unet_calls": sum(c["unet_calls_with_pilot"] * c["n"] for c in mine),
            "calibration_by_noise": json.loads(training.read_text())["calibration_by_noise"]}


def theory_rewards(folder: Path, mean: float, std: float, targets: list[str]) -> list[float]:
    """E[r | y = a] at the sweep's targets if reward and label noise were Gaussian: the label pulled toward the mean by
    the share of its variance that is noise, mean + (a - mean) (1 - noise_std^2 / label var)."""
    noise_std = json.loads((folder / LABELS).with_suffix(".json").read_text())["noise_std"]
    return [mean + (float(a) - mean) * (1 - noise_std**2 / std**2) for a in targets]


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (MMD needs 3 images per combination; --quick samples 1)."""
    return None if None in values else float(np.mean(values))


def prompt_colours(sweep: Path) -> dict:
    """Mean of each colour channel of the unguided images, per prompt: prompts that name colours show them."""
    from rcgdm.files.png import load_png

    rows = [r for r in result_rows(sweep) if r["guidance"] not in ("auto", "posterior") and float(r["guidance"]) == 0]
    out = {}
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        pixels = np.stack([load_png(sweep / r["file"]).permute(1, 2, 0).numpy() for r in rows if r["prompt"] == prompt])
        out[prompt] = dict(zip(("red", "green", "blue"), pixels.mean((0, 1, 2)).round(3).tolist(), strict=True))
    return out


def result_rows(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv", newline="") as f:
        return list(csv.DictReader(f))
