"""Figures, drawn with matplotlib's Agg backend and written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from rcgdm.atomic import atomic_path


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
