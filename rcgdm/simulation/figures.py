"""The simulation's two figures: mean reward against target, and off-subspace deviation against target, per sampler."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from rcgdm.plots import save_figure
from rcgdm.simulation.experiment import SAMPLERS

FIGURES = ("reward_vs_target.png", "off_subspace_vs_target.png")
LABELS = {"exact": "exact p(x | y = a)", "fixed": "guidance, fixed strength", "posterior": "guidance, posterior strength",
          "conditional": "conditional model (pseudo-labels)"}


def draw_figures(summary: dict, folder: Path) -> None:
    """FIGURES into `folder` from a summary's rows; the labels' range shaded."""
    for name, key, ylabel in (("reward_vs_target.png", "reward_mean", "mean true reward r(x)"),
                              ("off_subspace_vs_target.png", "off_subspace", "||(I - AA^T) x|| / ||x||")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.axvspan(summary["labels"]["min"], summary["labels"]["max"], color="0.92", label="labels' range")
        for sampler in SAMPLERS:
            rows = [r for r in summary["rows"] if r["sampler"] == sampler]
            ax.plot([r["target"] for r in rows], [r[key] for r in rows], marker="o", label=LABELS[sampler])
        if key == "reward_mean":
            targets = sorted({r["target"] for r in summary["rows"]})
            ax.plot(targets, targets, color="grey", linestyle=":", label="reward = target")
        ax.set_xlabel("target a")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        save_figure(fig, folder / name)
