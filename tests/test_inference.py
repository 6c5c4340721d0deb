"""inference.py end to end on the tiny model: sweeps, layout, figures, seeds, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import error_line, read_rows, run_script
from PIL import Image

from rcgdm.files.atomic import save_torch
from rcgdm.predictor import ThreeLayerConvNet, predictor_checkpoint
from rcgdm.sweep.outputs import REPORT_FILES

NAME = re.compile(r"^(\d+)_gt_(-?\d+\.\d{4})_pred_(-?\d+\.\d{4})\.png$")


@pytest.fixture
def run(tmp_path, reward_model_path, predictor_path):
    def run_inference(*args, out="run"):
        base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path]
        base += ["--num_inference_steps", "4", "--seed", "0"]
        if out is not None:
            base += ["--out_dir", tmp_path / out]
        return run_script("inference.py", *base, *args)

    return run_inference


def test_a_sweep_writes_rows_folders_and_figures(tmp_path, run):
    args = ["--prompt", "a cat", "a dog", "--target", "-4", "-2", "--guidance", "0", "10", "--num_images", "3", "--bs", "2"]
    assert run(*args) == 0
    out = tmp_path / "run"
    rows = read_rows(out / "results.csv")
    assert len(rows) == 2 * 2 * 2 * 3
    columns = ["prompt", "target", "guidance", "best_of", "image", "seed", "image_seed", "gt", "pred", "shift", "unet_calls",
               "file", "guidance_used", "pilot_unet_calls", "particles", "final_ess"]
    assert list(rows[0]) == columns
    assert all(float(r["shift"]) > 0 for r in rows)  # the predictor carries its training latents
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(f"prompt{k}_target{t}guidance{g}" for k in (0, 1) for t in (-4.0, -2.0) for g in (0.0, 10.0))
    for row in rows:
        match = NAME.match((out / row["file"]).name)
        assert match and (out / row["file"]).is_file()
        assert int(match[1]) == int(row["image"]) and float(match[2]) == pytest.approx(float(row["gt"]), abs=5e-5)
        with Image.open(out / row["file"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    seeds = {(r["image"], r["image_seed"]) for r in rows}
    assert len(seeds) == 3  # image i has one seed in every combination

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["combinations"]) == 8 and summary["settings"]["seed_used"] == 0
    first = summary["combinations"][0]
    mine = [float(r["gt"]) for r in rows if (r["prompt"], float(r["target"]), float(r["guidance"])) == ("a cat", -4.0, 0.0)]
    assert first["gt_mean"] == pytest.approx(np.mean(mine), abs=1e-6) and first["n"] == 3
    # unguided images do not depend on the target
    unguided = {(r["prompt"], r["image"], r["gt"]) for r in rows if float(r["guidance"]) == 0}
    assert len(unguided) == 2 * 3

    assert all(c["shift_vs_unguided"] == pytest.approx(1.0) for c in summary["combinations"] if c["guidance"] == 0)
    for figure in ("reward_vs_target.png", "shift_vs_target.png", "grid.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "grid.png") as grid:
        width, height = grid.size
    assert 1.0 < width / height < 2.5  # 3 columns (unguided, 2 targets) by 2 prompt rows


def test_single_combination_keeps_the_original_layout(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("--target", "1", "--guidance", "10", "--num_images", "3", "--bs", "2", out=None) == 0
    folder = tmp_path / "imgs" / "target1.0guidance10.0"
    names = sorted(p.name for p in folder.glob("*.png") if NAME.match(p.name))
    assert [NAME.match(n)[1] for n in names] == ["0", "1", "2"]  # 3 images, though 3 is not a multiple of --bs 2
    assert (folder / "results.csv").is_file() and (folder / "grid.png").is_file()


def test_batch_size_does_not_change_the_images(tmp_path, run):
    assert run("--target", "-3", "--guidance", "10", "--num_images", "3", "--bs", "1", out="bs1") == 0
    assert run("--target", "-3", "--guidance", "10", "--num_images", "3", "--bs", "3", out="bs3") == 0
    a, b = read_rows(tmp_path / "bs1/results.csv"), read_rows(tmp_path / "bs3/results.csv")
    for x, y in zip(a, b, strict=True):
        assert float(x["gt"]) == pytest.approx(float(y["gt"]), abs=1e-3)
        assert float(x["pred"]) == pytest.approx(float(y["pred"]), abs=1e-3)
        one, three = (np.asarray(Image.open(tmp_path / d / r["file"]), dtype=int) for d, r in (("bs1", x), ("bs3", y)))
        assert np.abs(one - three).max() <= 1


def test_random_seed_is_recorded_and_reproduces(tmp_path, run, reward_model_path, predictor_path):
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path,
            "--num_inference_steps", "3"]
    assert run_script("inference.py", *base, "--num_images", "2", "--out_dir", tmp_path / "r1") == 0
    seed = json.loads((tmp_path / "r1/summary.json").read_text())["settings"]["seed_used"]
    assert seed >= 0
    assert run_script("inference.py", *base, "--num_images", "2", "--seed", str(seed), "--out_dir", tmp_path / "r2") == 0
    assert [r["gt"] for r in read_rows(tmp_path / "r1/results.csv")] == [r["gt"] for r in read_rows(tmp_path / "r2/results.csv")]


def test_existing_images_are_not_overwritten_silently(tmp_path, run, capsys):
    assert run("--num_images", "2") == 0
    before = sorted(p for p in (tmp_path / "run").glob("*.png") if NAME.match(p.name))
    assert run("--num_images", "2", "--target", "1") == 2
    assert "already exists (an earlier run's output); use --overwrite" in error_line(capsys.readouterr().err)
    for name in (*REPORT_FILES, ".sweep.files.json"):  # the images alone are still protected
        (tmp_path / "run" / name).unlink(missing_ok=True)
    assert run("--num_images", "2", "--target", "1") == 2
    line = error_line(capsys.readouterr().err)  # a folder from before records: its images are an earlier run's
    assert "_gt_" in line and "already exists (an earlier run's output); use --overwrite" in line
    assert sorted(p for p in (tmp_path / "run").glob("*.png") if NAME.match(p.name)) == before
    assert run("--num_images", "1", "--overwrite") == 0
    assert len([p for p in (tmp_path / "run").glob("*.png") if NAME.match(p.name)]) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--target", "nan"], "--target: 'nan' is not finite; expected a finite number"),
        (["--guidance", "inf"], "--guidance: 'inf' is not finite"),
        (["--guidance", "strong"], "--guidance: 'strong' is not a number"),
        (["--num_images", "0"], "--num_images: '0' is too small; expected an integer >= 1"),
        (["--bs", "0"], "--bs: '0' is too small; expected an integer >= 1"),
        (["--scheduler", "warp"], "--scheduler 'warp' is unknown; expected one of pndm, ddim"),
        (["--prompt", " "], "--prompt ' ' is blank"),
        (["--height", "60"], "--height 60 is not a multiple of 8"),
        (["--seed", "-5"], "--seed -5 is out of range"),
        (["--reward_model", "MISSING"], "does not exist; expected a file written by this project"),
        (["--predictor", "MISSING"], "does not exist; expected a file written by this project"),
        (["--predictor", "WIDE"], "trained on 8-channel latents; the model's VAE makes 4"),
        (["--predictor", "REWARD"], "has format 'rcgdm.reward/1'; expected 'rcgdm.predictor/1'"),
        (["--out_dir", "A_FILE"], "is a file; expected a directory"),
        (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 on cpu is not supported"),
        (["--prompt", "a \udcff photo"], "--prompt 'a \\udcff photo' is not valid UTF-8 text"),  # bytes argv cannot decode
        (["--prompt", "a\x07photo"], "holds control characters"),
        (["--num_images", "1000000000"], "--num_images 1000000000 images of 64x64 in batches of 4 need at least"),
        (["--num_images", "2", "--bs", "2", "--height", "4096", "--width", "4096"], "trained on 8x8 latents"),
        (["--guidance", "10", "--particles", "2"], "--scheduler 'pndm' steps deterministically, and particles need"),
        (["--guidance", "auto", "--particles", "2"], "--particles with --guidance auto"),
        (["--particles", "5000"], "--particles 5000 is more than 4096"),
    ],
)
def test_bad_input_is_one_line_and_samples_nothing(tmp_path, run, capsys, reward_model_path, args, expected):
    wide = tmp_path / "wide.pth"
    save_torch(predictor_checkpoint(ThreeLayerConvNet(in_channels=8), {"latent_channels": 8}), wide)
    (tmp_path / "a_file").write_text("x")
    swap = {"MISSING": tmp_path / "missing.pth", "WIDE": wide, "REWARD": reward_model_path, "A_FILE": tmp_path / "a_file"}
    assert run(*[swap.get(a, a) for a in args]) == 2
    assert expected in error_line(capsys.readouterr().err)
    assert not list(tmp_path.rglob("*_gt_*.png"))


def test_hub_model_offline_is_a_clear_error(tmp_path, reward_model_path, predictor_path, capsys):
    assert run_script(
        "inference.py", "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--reward_model", reward_model_path,
        "--predictor", predictor_path, "--out_dir", tmp_path / "out", "--seed", "0",
    ) == 2
    line = error_line(capsys.readouterr().err)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in line and "--model tiny" in line


def test_guidance_zero_images_match_the_stock_pipeline_through_the_cli(tmp_path, run):
    """The saved PNGs at guidance 0 are the stock pipeline's images, quantised the same way."""
    from rcgdm.models import load_pipeline
    from rcgdm.seeds import image_generators

    assert run("--num_images", "2", "--bs", "2", "--guidance", "0") == 0
    pipe = load_pipeline("tiny-random")
    generators = image_generators(0, range(2))
    stock = pipe("a nice photo", num_images_per_prompt=2, generator=generators, num_inference_steps=4, output_type="pil").images
    rows = read_rows(tmp_path / "run/results.csv")
    for row, image in zip(rows, stock, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / row["file"])), np.asarray(image))


def test_distribution_shift_is_the_rms_distance_to_the_nearest_training_latents():
    from rcgdm.evaluate import distribution_shift

    base = torch.randn(1, 4, 8, 8)
    reference = torch.cat([base.expand(5, -1, -1, -1), base + 100])  # five copies of `base`, and one far away
    latents = torch.cat([base + 0.3, base - 0.7])
    assert torch.allclose(distribution_shift(latents, reference), torch.tensor([0.3, 0.7]), atol=1e-5)
    assert distribution_shift(latents, None) is None
    assert distribution_shift(torch.randn(2, 4, 16, 16), reference) is None  # sampled at another size: not comparable


@pytest.mark.parametrize(("edit", "extra", "expected"), [
    ({"scheduler": {"prediction_type": "sample"}}, ["--scheduler", "pndm"], "cannot step"),
    ({"scheduler": {"prediction_type": "sample"}}, ["--scheduler", "PNDMScheduler"], "(PNDMScheduler) cannot step"),
    ({"unet": {"sample_size": 16}}, [], "was trained on 8x8 latents (64x64 images); this run samples 16x16"),
    ({"vae": {"block_out_channels": 7}}, [], "vae/config.json field 'block_out_channels' holds 7; expected a list"),
    ({"scheduler": {"prediction_type": "flow"}}, [], "predicts 'flow'; expected one of epsilon, v_prediction, sample"),
    ({"unet": {"in_channels": 16, "out_channels": 16}, "vae": {"latent_channels": 16}}, [],
     "trained on 4-channel latents; the model's VAE makes 16"),
    ({"unet": {"in_channels": 16}}, [], "unet/config.json takes 16 and returns 4 channels"),
])
def test_a_model_the_term_cannot_guide_is_refused_before_it_loads(tmp_path, capsys, tiny_model_dir, reward_model_path,
                                                                    predictor_path, edit, extra, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for component, changes in edit.items():
        config = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights: they must never be read")
    args = ["--model", folder, "--reward_model", reward_model_path, "--predictor", predictor_path, "--ignore_provenance",
            "--out_dir", tmp_path / "out", *extra]
    assert run_script("inference.py", *args) == 2
    assert expected in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
