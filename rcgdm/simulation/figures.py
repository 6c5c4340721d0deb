"""The simulation's figures, per sampler against the target: mean reward, off-subspace deviation, and W2 to the answer."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from rcgdm.plots import save_figure
from rcgdm.simulation.bound import MEASURES, SHARES
from rcgdm.simulation.bound import SAMPLERS as BOUND_SAMPLERS
from rcgdm.simulation.experiment import SAMPLERS

FIGURES = ("reward_vs_target.png", "off_subspace_vs_target.png", "w2_vs_target.png", "particles.png")
LABELS = {"exact": "exact p(x | y = a)", "fixed": "guidance, fixed strength", "posterior": "guidance, posterior strength",
          "posterior_calibrated": "guidance, calibrated predictor's likelihood",
          "conditional": "conditional model (pseudo-labels)"}


def draw_figures(summary: dict, folder: Path) -> None:
    """FIGURES into `folder` from a summary's rows; the labels' range shaded."""
    for name, key, ylabel in (("reward_vs_target.png", "reward_mean", "mean true reward r(x)"),
                              ("off_subspace_vs_target.png", "off_subspace", "||(I - AA^T) x|| / ||x||"),
                              ("w2_vs_target.png", "w2", "W2 to p(x | y = a) (exact draws: the floor)")):
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
        if key == "w2":
            ax.set_yscale("log")
        ax.set_xlabel("target a")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        save_figure(fig, folder / name)
    draw_particles(summary, folder / "particles.png")


def draw_particles(summary: dict, path: Path) -> None:
    """W2 to p(x | y = a) as a multiple of the exact draws', and the reward std, against the particles per point K, per
    particle target: the rows smc_K (the level-blind proposal, the exact final weight), and smc_calibrated_16 as a cross."""
    fig, (w2_ax, std_ax) = plt.subplots(1, 2, figsize=(10, 4))
    smc = [r for r in summary["rows"] if r["sampler"].startswith("smc_")]
    floor = {r["target"]: r["w2"] for r in summary["rows"] if r["sampler"] == "exact"}
    for colour, a in enumerate(dict.fromkeys(r["target"] for r in smc)):
        for calibrated, style in ((False, "o-"), (True, "x")):
            rows = [r for r in smc if r["target"] == a and r["sampler"].startswith("smc_calibrated") == calibrated]
            label = f"a = {a:g}" + (", calibrated" if calibrated else "")
            for ax, values in ((w2_ax, [math.nan if r["w2"] is None else r["w2"] / floor[a] for r in rows]),
                               (std_ax, [math.nan if r["w2"] is None else r["reward_std"] for r in rows])):
                ax.plot([r["particles"] for r in rows], values, style, color=f"C{colour}", label=label)
    w2_ax.axhline(1, color="grey", linestyle=":", label="exact draws")
    exact_std = next((r["exact_reward_std"] for r in summary["rows"] if r["sampler"] == "exact"), None)
    if exact_std is not None:
        std_ax.axhline(exact_std, color="grey", linestyle=":", label="exact")
    for ax, ylabel in ((w2_ax, "W2 to p(x | y = a) / exact draws' W2"), (std_ax, "reward std")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("particles per sample K")
        ax.set_ylabel(ylabel)
    w2_ax.legend(fontsize=7)
    save_figure(fig, path)


BOUND_FIGURE = "bound.png"


def draw_bound(bound: dict, folder: Path) -> None:
    """BOUND_FIGURE: |shortfall|, W2 and off-subspace fraction against labelled points (log-log), per sampler and share
    of theta off the subspace, with standard errors over the worlds."""
    titles = {"shortfall": "|E[r | y = a] - mean reward|", "w2": "W2 to p(x | y = a)", "off_subspace": "off-subspace fraction"}
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4))
    for ax, key in zip(axes, MEASURES, strict=True):
        for colour, name in enumerate(BOUND_SAMPLERS):
            for style, share in zip(("-", "--", ":"), SHARES, strict=True):
                rows = [r for r in bound["table"] if (r["sampler"], r["off_subspace_share"]) == (name, share)]
                values = [math.nan if r[key] is None else r[key] for r in rows]
                errors = [0 if r[f"{key}_se"] is None else r[f"{key}_se"] for r in rows]
                ax.errorbar([r["num_labelled"] for r in rows], values, yerr=errors, color=f"C{colour + 3}", linestyle=style,
                            marker="o", markersize=3, label=f"{LABELS[name]}, share off {share:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("labelled points n")
        ax.set_title(titles[key], fontsize=10)
    axes[0].legend(fontsize=6)
    save_figure(fig, folder / BOUND_FIGURE)
