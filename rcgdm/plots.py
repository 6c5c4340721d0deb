"""Figures, drawn with matplotlib's Agg backend and written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from rcgdm.files.atomic import atomic_path
from rcgdm.sampling.guidance import guidance_label, guidance_order


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def loss_curve(history: list[dict], path: str | Path) -> None:
    """Train and validation MSE per epoch, with the predict-the-mean baseline dashed."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train (noisy latents)")
    if history and history[0]["val_loss"] is not None:
        ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation (fixed noise)")
        ax.axhline(history[0]["baseline_val_loss"], color="grey", linestyle="--", label="predict-the-mean baseline")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.set_title("reward predictor training")
    ax.legend()
    save_figure(fig, path)


def loss_by_noise(epoch: dict, path: str | Path) -> None:
    """Validation MSE per timestep bucket of one epoch (metrics.jsonl's val_loss_by_noise), with the baseline; for a
    calibrated predictor, the variance it predicted beside each bar (val_variance_by_noise)."""
    buckets = {name: loss for name, loss in epoch["val_loss_by_noise"].items() if loss is not None}
    variances = epoch.get("val_variance_by_noise")
    fig, ax = plt.subplots(figsize=(6, 4))
    places = range(len(buckets))
    width = 0.4 if variances else 0.8
    ax.bar([p - width / 2 * bool(variances) for p in places], list(buckets.values()), width, color="C1",
           label="validation squared error (fixed noise)")
    if variances:
        ax.bar([p + width / 2 for p in places], [variances[name] for name in buckets], width, color="C0",
               label="variance the predictor predicted")
    ax.set_xticks(list(places), list(buckets))
    ax.axhline(epoch["baseline_val_loss"], color="grey", linestyle="--", label="predict-the-mean baseline")
    ax.set_xlabel("timestep bucket (higher t = noisier latent)")
    ax.set_ylabel("MSE")
    ax.set_title(f"reward predictor by noise level, epoch {epoch['epoch']}")
    ax.legend()
    save_figure(fig, path)


def _panels(combos: list[dict]) -> tuple:
    """One panel per prompt of a sweep, side by side -> (figure, [(prompt, axes, the prompt's combinations)])."""
    prompts = list(dict.fromkeys(c["prompt"] for c in combos))
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 4.5), squeeze=False, sharey=True)
    panels = [(prompt, ax, [c for c in combos if c["prompt"] == prompt]) for prompt, ax in zip(prompts, axes[0], strict=True)]
    for prompt, ax, _ in panels:
        if len(prompts) > 1:
            ax.set_title(repr(prompt) if prompt else "(unconditional)", fontsize=9)
        ax.set_xlabel("target reward")
    return fig, panels


def _series(combos: list[dict]) -> list[tuple]:
    """The (guidance, best_of) pairs of `combos`, in order (numbers, then auto)."""
    return sorted({(c["guidance"], c["best_of"]) for c in combos}, key=lambda s: (guidance_order(s[0]), s[1]))


def reward_vs_target(combos: list[dict], path: str | Path) -> None:
    """Mean ground-truth (solid) and predicted (dashed) reward against target, std bars, one colour per
    guidance; one panel per prompt."""
    fig, panels = _panels(combos)
    several_n = len({c["best_of"] for c in combos}) > 1
    for _, ax, mine in panels:
        targets = sorted({c["target"] for c in mine})
        for k, (guidance, best_of) in enumerate(_series(mine)):
            rows = sorted((c for c in mine if (c["guidance"], c["best_of"]) == (guidance, best_of)), key=lambda c: c["target"])
            series = f"guidance {guidance_label(guidance)}" + (f", best of {best_of}" if several_n else "")
            for kind, style, marker in (("gt", "-", "o"), ("pred", "--", "x")):
                ax.errorbar([c["target"] for c in rows], [c[f"{kind}_mean"] for c in rows], yerr=[c[f"{kind}_std"] for c in rows],
                            linestyle=style, marker=marker, color=f"C{k % 10}", capsize=3,
                            label=f"{series}, {'ground truth' if kind == 'gt' else 'predicted'}")
        ax.plot([min(targets), max(targets)], [min(targets), max(targets)], color="grey", linestyle=":", label="y = target")
    panels[0][1].set_ylabel("reward of generated images (mean ± std)")
    panels[0][1].legend(fontsize=8)
    fig.suptitle("reward-directed generation")
    save_figure(fig, path)


def shift_vs_target(combos: list[dict], path: str | Path) -> bool:
    """Distribution shift (mean ± std RMS distance of final latents to the predictor's training latents)
    against target, one line per guidance, the unguided level dotted; one panel per prompt: the other half
    of Figure 6, where overly extrapolated targets leave the data. -> whether there was anything to draw."""
    known = [c for c in combos if c["shift_mean"] is not None and c["best_of"] == 1]
    if not known:
        return False
    fig, panels = _panels(known)
    for _, ax, mine in panels:
        for k, guidance in enumerate(sorted({c["guidance"] for c in mine}, key=guidance_order)):
            rows = sorted((c for c in mine if c["guidance"] == guidance), key=lambda c: c["target"])
            xs, ys, errors = [c["target"] for c in rows], [c["shift_mean"] for c in rows], [c["shift_std"] for c in rows]
            if guidance == 0:
                level = sum(ys) / len(ys)
                ax.axhline(level, color="grey", linestyle=":", label=f"unguided ({level:.3f})")
            else:
                ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{k % 10}",
                            label=f"guidance {guidance_label(guidance)}")
        ax.legend(fontsize=8)
    panels[0][1].set_ylabel("distance to 5 nearest training latents (RMS)")
    fig.suptitle("distribution shift of generated latents")
    save_figure(fig, path)
    return True


def reward_vs_compute(combos: list[dict], path: str | Path) -> dict[str, list[tuple[float, float, int]]]:
    """Mean ground-truth distance to target against UNet calls per image (an auto strength's pilot included): one line
    per guidance level across best-of-N values (guidance 0 is plain best-of-N sampling). -> the series drawn:
    label -> [(UNet calls, distance, N)]."""
    drawn = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, guidance in enumerate(sorted({c["guidance"] for c in combos}, key=guidance_order)):
        points = []
        for best_of in sorted({c["best_of"] for c in combos if c["guidance"] == guidance}):
            group = [c for c in combos if (c["guidance"], c["best_of"]) == (guidance, best_of)]
            calls = sum(c["unet_calls_with_pilot"] for c in group) / len(group)
            points.append((calls, sum(c["gt_distance"] for c in group) / len(group), best_of))
        label = f"guidance {guidance_label(guidance)}"
        drawn[label] = points
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{k % 10}", label=label)
        for calls, distance, best_of in points:
            ax.annotate(f"N={best_of}", (calls, distance), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("UNet calls per image")
    ax.set_ylabel("mean |ground truth - target|")
    ax.set_title("reward guidance vs best-of-N at equal compute")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return drawn


def ess_per_step(combos: list[dict], path: str | Path) -> bool:
    """With particles (rcgdm/sampling/particles.py): their effective share before each step's resampling and after the final
    weight, averaged over a combination's images, one line per combination. -> whether there was anything to draw."""
    known = [c for c in combos if c.get("ess_per_step") is not None]
    if not known:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, c in enumerate(known):
        label = f"target {c['target']:g}, guidance {guidance_label(c['guidance'])}, K = {c['particles']}"
        ax.plot(range(len(c["ess_per_step"])), c["ess_per_step"], marker=".", color=f"C{k % 10}", label=label)
    ax.set_xlabel("step (the last point: after the final weight)")
    ax.set_ylabel("effective particles / K")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def reward_vs_distance(combos: list[dict], path: str | Path) -> bool:
    """Mean ground truth against MMD^2 to the unguided images of the same prompt (± its standard error), one point per
    combination, one colour per guidance, each labelled with its target; one panel per prompt: what the guidance bought
    (reward) against what it cost (distance from the model's own distribution). -> whether there was anything to draw."""
    known = [c for c in combos if c.get("mmd_to_unguided") is not None]
    if not known:
        return False
    fig, panels = _panels(known)
    series = _series(known)
    for _, ax, mine in panels:
        for k, (guidance, best_of) in enumerate(series):
            rows = sorted((c for c in mine if (c["guidance"], c["best_of"]) == (guidance, best_of)), key=lambda c: c["target"])
            if not rows:
                continue
            label = f"guidance {guidance_label(guidance)}" + (f", best of {best_of}" if best_of > 1 else "")
            ax.errorbar([c["mmd_to_unguided"] for c in rows], [c["gt_mean"] for c in rows],
                        xerr=[c["mmd_to_unguided_se"] for c in rows], linestyle="none", marker="o", capsize=3,
                        color=f"C{k % 10}", label=label)
            unguided = guidance == 0 and best_of == 1  # one set of images, whatever the target
            for c in rows[:1] if unguided else rows:
                ax.annotate("unguided" if unguided else f"{c['target']:g}", (c["mmd_to_unguided"], c["gt_mean"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(0, color="grey", linestyle=":")
        ax.set_xlabel("MMD² to the unguided images (± s.e.)")
        ax.legend(fontsize=8)
    panels[0][1].set_ylabel("mean ground-truth reward (labels: target)")
    fig.suptitle("reward bought against distance from the unguided distribution")
    save_figure(fig, path)
    return True


def image_grid(rows: list[str], columns: list[str], images: list[list], captions: list[list[str]], path: str | Path) -> None:
    """A rows x columns grid of images (float tensors (3, H, W) in [0, 1]) with row, column and per-image captions."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row_label in enumerate(rows):
        for c, column_label in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(images[r][c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[r][c], fontsize=7)
            if r == 0:
                ax.set_title(column_label, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_label, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
