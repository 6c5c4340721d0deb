"""Every number a sweep reports, recomputed here from its rows, its images and its inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import read_rows, run_script
from PIL import Image

from rcgdm.evaluate import NEAREST, distribution_shift, predicted_reward
from rcgdm.models import load_vae
from rcgdm.predictor import load_predictor
from rcgdm.rewards import load_reward

PROMPTS, TARGETS, GUIDANCE, IMAGES = ("a nice photo", "a red circle"), ("1", "2"), ("0", "10"), 3


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, reward_model_path, predictor_path):
    out = tmp_path_factory.mktemp("report") / "sweep"
    args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--prompt", *PROMPTS, "--target", *TARGETS, "--guidance", *GUIDANCE, "--num_images", str(IMAGES), "--bs", "2",
            "--num_inference_steps", "3", "--out_dir", out]
    assert run_script("inference.py", *args) == 0
    return out, read_rows(out / "results.csv"), json.loads((out / "summary.json").read_text())


def test_the_summary_is_the_rows_summarised(sweep):
    _, rows, summary = sweep
    combos = summary["combinations"]
    assert len(combos) == len(PROMPTS) * len(TARGETS) * len(GUIDANCE) and len(rows) == len(combos) * IMAGES
    unguided_shift = {prompt: [] for prompt in PROMPTS}
    for c in combos:
        key = (c["prompt"], c["target"], c["guidance"])
        mine = [r for r in rows if (r["prompt"], float(r["target"]), float(r["guidance"])) == key]
        gt, pred, shift = (np.array([float(r[k]) for r in mine]) for k in ("gt", "pred", "shift"))
        assert c["n"] == len(mine) == IMAGES
        assert c["gt_mean"] == pytest.approx(gt.mean(), rel=1e-6) and c["gt_std"] == pytest.approx(gt.std(), rel=1e-5)
        assert c["pred_mean"] == pytest.approx(pred.mean(), rel=1e-6) and c["pred_std"] == pytest.approx(pred.std(), rel=1e-5)
        assert c["gt_distance"] == pytest.approx(np.abs(gt - c["target"]).mean(), rel=1e-6)
        assert c["shift_mean"] == pytest.approx(shift.mean(), rel=1e-6) and c["shift_std"] == pytest.approx(shift.std(), rel=1e-5)
        # PNDM takes 3 steps in 4 UNet calls (its first timestep twice); one batched call covers both CFG branches
        assert c["unet_calls"] == 4 == int(mine[0]["unet_calls"])
        if c["guidance"] == 0:
            unguided_shift[c["prompt"]].append(shift.mean())
    for c in combos:  # relative to the unguided images of the same prompt
        assert c["shift_vs_unguided"] == pytest.approx(c["shift_mean"] / np.mean(unguided_shift[c["prompt"]]), rel=1e-6)


def test_the_saved_images_score_what_their_rows_say(sweep, reward_model_path, predictor_path):
    """Re-scored from the PNG files: the reward on the image, the predictor on the VAE posterior mean (the rows were
    scored before the images were quantised to 8 bits, hence the tolerance)."""
    out, rows, _ = sweep
    reward, _ = load_reward(reward_model_path)
    predictor = load_predictor(predictor_path, latent_channels=4).net
    vae = load_vae("tiny-random")
    for row in rows:
        path = out / row["file"]
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            gt, pred = reward(image).item(), predicted_reward(predictor, vae, image).item()
        assert gt == pytest.approx(float(row["gt"]), abs=2e-3)
        assert pred == pytest.approx(float(row["pred"]), abs=1e-2)
        name = re.fullmatch(r"(\d+)_gt_(-?[\d.]+)_pred_(-?[\d.]+)\.png", path.name)
        assert name and int(name[1]) == int(row["image"])
        assert (name[2], name[3]) == (f"{float(row['gt']):.4f}", f"{float(row['pred']):.4f}")


def test_the_grid_has_a_cell_per_target_and_one_unguided(sweep):
    out, _, _ = sweep
    width, height = Image.open(out / "grid.png").size
    # plots.image_grid: 2.2 x 2.4 inches per cell at 120 dpi, trimmed to the drawing (bbox_inches="tight")
    columns, rows = 1 + len(TARGETS), len(PROMPTS)
    assert 0.8 * 2.2 * 120 * columns < width <= 2.2 * 120 * columns + 60
    assert 0.8 * 2.4 * 120 * rows < height <= 2.4 * 120 * rows + 60


def test_the_shift_is_the_mean_distance_to_the_nearest_training_latents():
    """Reference latents at distinct, known distances: the measure averages exactly the NEAREST closest."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=generator)
    direction = torch.randn(1, 4, 8, 8, generator=generator)
    direction = direction / direction.norm() * (4 * 8 * 8) ** 0.5  # RMS distance 1 per unit step
    steps = torch.tensor([0.5, 3.0, 1.0, 7.0, 2.0, 0.25, 5.0, 4.0])
    reference = base + steps.view(-1, 1, 1, 1) * direction
    expected = steps.sort().values[:NEAREST].mean()  # 0.25, 0.5, 1, 2, 3
    torch.testing.assert_close(distribution_shift(base, reference), expected.view(1), rtol=1e-5, atol=1e-5)
    assert NEAREST == 5
