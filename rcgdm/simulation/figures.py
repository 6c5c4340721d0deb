"""The simulation's two figures: mean reward against target, and off-subspace deviation against target, per sampler."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from rcgdm.plots import save_figure
from rcgdm.simulation.experiment import SAMPLERS

FIGURES = ("reward_vs_target.png", "off_subspace_vs_target.png")
LABELS = {"exact": "exact p(x | y = a)", "fixed": "guidance, fixed strength", "posterior": "guidance, posterior strength",
          "posterior_calibrated": "guidance, calibrated predictor's likelihood",
          "conditional": "conditional model (pseudo-labels)"}


def draw_figures(summary: dict, folder: Path) -> None:
    """FIGURES into `folder` from a summary's rows; the labels' range shaded."""
    for name, key, ylabel in (("reward_vs_target.png", "reward_mean", "mean true reward r(x)"),
                              ("off_subspace_vs_target.png", "off_subspace", "||(I - AA^T) x|| / ||x||")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.axvspan(summary["labels"]["min"], summary["labels"]["max"], color="0.92", label="labels' range")
        targets = sorted({r["target"] for r in summary["rows"]})
        shown = (targets[0] - 1.5, targets[-1] + 1.5)  # rewards far off the targets leave the plot, said in the legend
        for sampler in SAMPLERS:
            rows = [r for r in summary["rows"] if r["sampler"] == sampler]
            values = [math.nan if r[key] is None else r[key] for r in rows]  # a diverged sampler leaves a gap
            off = key == "reward_mean" and any(not shown[0] <= v <= shown[1] for v in values if not math.isnan(v))
            label = LABELS[sampler] + (" (partly off the plot)" if off else "")
            ax.plot([r["target"] for r in rows], values, marker="o", label=label)
        if key == "reward_mean":
            ax.plot(targets, targets, color="grey", linestyle=":", label="reward = target")
            ax.set_ylim(*shown)
        ax.set_xlabel("target a")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        save_figure(fig, folder / name)
