"""One row per image of a run (results.csv, progress files), and the key that ties rows to their combination."""

from __future__ import annotations

import re
from pathlib import Path

from rcgdm.seeds import image_seed

COLUMNS = ("prompt", "target", "guidance", "best_of", "image", "seed", "image_seed", "gt", "pred", "shift", "unet_calls", "file",
           "guidance_used", "pilot_unet_calls", "particles", "final_ess")  # a row's "ess" (per step) is summary.json's
KEY = ("prompt", "target", "guidance", "best_of")  # a combination of the sweep; with "image", one image of the run
TYPES = {"prompt": str, "target": (int, float), "guidance": (int, float, str), "best_of": int, "image": int, "file": str}
IMAGE_GLOB = "*_gt_*_pred_*.png"
_IMAGE_NAME = re.compile(r"\d+_gt_-?\d+\.\d{4}_pred_-?\d+\.\d{4}\.png")


def is_image_name(name: str) -> bool:
    """Whether `name` is exactly as `image_name` writes it (a file named otherwise is never the run's)."""
    return _IMAGE_NAME.fullmatch(name) is not None


def image_name(index: int, gt: float, pred: float) -> str:
    """{idx}_gt_{gt:.4f}_pred_{pred:.4f}.png, the original code's name for an image."""
    return f"{index}_gt_{gt:.4f}_pred_{pred:.4f}.png"


def image_row(combo_key: tuple, image: int, seed: int, gt: float, pred: float, shift: float | None, unet_calls: int,
              file: str, guidance_used: float, pilot_unet_calls: float = 0.0, particles: int = 1,
              ess: list[float] | None = None) -> dict:
    """The results row of image `image` of the combination `combo_key` (the fields of COLUMNS, in order, then "ess").
    guidance_used: the strength applied ("auto" chose it; "posterior" varies by step); pilot_unet_calls: the image's
    share of the auto pilot; particles: per image (1: none); ess: with particles, their effective share at each step
    and after the final weight (final_ess: the last), else None."""
    return {**dict(zip(KEY, combo_key, strict=True)), "image": image, "seed": seed, "image_seed": image_seed(seed, image),
            "gt": gt, "pred": pred, "shift": shift, "unet_calls": unet_calls, "file": file, "guidance_used": guidance_used,
            "pilot_unet_calls": pilot_unet_calls, "particles": particles, "final_ess": None if ess is None else ess[-1],
            "ess": ess}


def combo_key(row: dict) -> tuple:
    """(prompt, target, guidance, best_of) of a row (or of anything with those fields, as a dict)."""
    return tuple(row[field] for field in KEY)


def image_key(row: dict) -> tuple:
    """(prompt, target, guidance, best_of, image): one image of a run."""
    return (*combo_key(row), row["image"])


def unique_rows(rows: list[dict]) -> list[dict]:
    """`rows` without repeats of the same image (the first is kept)."""
    seen: dict[tuple, dict] = {}
    for row in rows:
        seen.setdefault(image_key(row), row)
    return list(seen.values())


def is_valid(row: object) -> bool:
    """Whether `row`, read back from a file, has the key fields' types and names a file inside the run folder."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), kind) for k, kind in TYPES.items()):
        return False
    return ".." not in Path(row["file"]).parts and not Path(row["file"]).is_absolute()
