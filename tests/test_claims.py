"""README claims that had no test: the original's batch-mean flag, bf16 on CPU, .best.pth, a changed VAE at resume,
and Ctrl-C / SIGTERM in a real process."""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import error_line, popen, read_rows, run_script, wait_for
from safetensors.torch import load_file, save_file


def sweep(out, reward_model_path, predictor_path, *extra) -> list[str]:
    return ["inference.py", "--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path,
            "--seed", "0", "--num_images", "2", "--bs", "2", "--num_inference_steps", "3", "--target", "2", "--out_dir", out,
            *extra]


def test_batch_mean_guidance_at_g_is_ours_at_g_over_the_batch_size(tmp_path, reward_model_path, predictor_path):
    """README: the original's guidance g at batch size B equals ours at g / B; --batch_mean_guidance reproduces it."""
    assert run_script(*sweep(tmp_path / "original", reward_model_path, predictor_path, "--guidance", "40",
                             "--batch_mean_guidance")) == 0
    assert run_script(*sweep(tmp_path / "ours", reward_model_path, predictor_path, "--guidance", "20")) == 0
    assert run_script(*sweep(tmp_path / "plain", reward_model_path, predictor_path, "--guidance", "40")) == 0
    original, ours, plain = (read_rows(tmp_path / d / "results.csv") for d in ("original", "ours", "plain"))
    for a, b in zip(original, ours, strict=True):
        assert float(a["pred"]) == pytest.approx(float(b["pred"]), abs=1e-4)
        assert float(a["gt"]) == pytest.approx(float(b["gt"]), abs=1e-4)
    assert max(abs(float(a["pred"]) - float(c["pred"])) for a, c in zip(original, plain, strict=True)) > 1e-3


def test_bf16_on_cpu_samples_finite_images(tmp_path, reward_model_path, predictor_path):
    assert run_script(*sweep(tmp_path / "bf16", reward_model_path, predictor_path, "--guidance", "10", "--dtype", "bf16")) == 0
    rows = read_rows(tmp_path / "bf16" / "results.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r[k])) for r in rows for k in ("gt", "pred"))
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["settings"]["dtype"] == "bf16"


def train_args(tmp_path, model="tiny-random", *extra, out="out") -> list[str]:
    labels = tmp_path / "labels.npy"
    if not labels.exists():
        np.save(labels, np.linspace(0, 1, 64, dtype=np.float32)[:, None])
    return ["train.py", f"--model={model}", "--data=synthetic", "--num_data=64", "--image_size=64", "--val_fraction=0.25",
            "--batch_size=8", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}",
            f"--out_path={tmp_path / out / 'convnet.pth'}", *extra]


def test_best_pth_holds_the_best_validation_epoch(tmp_path):
    assert run_script(*train_args(tmp_path, "tiny-random", "--num_epochs=5", "--lr=0.01")) == 0
    history = [json.loads(line) for line in (tmp_path / "out" / "convnet.metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda h: h["val_loss"])
    assert best["epoch"] < 5, history  # this run's validation loss rises at its last epoch: the check needs that
    saved = torch.load(tmp_path / "out" / "convnet.best.pth", weights_only=True)
    assert saved["epochs"] == best["epoch"] and saved["val_loss"] == pytest.approx(best["val_loss"], rel=1e-12)
    # the same run stopped at the best epoch (training is seeded and deterministic) ends with exactly those weights
    assert run_script(*train_args(tmp_path, "tiny-random", f"--num_epochs={best['epoch']}", "--lr=0.01", out="short")) == 0
    stopped = torch.load(tmp_path / "short" / "convnet.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(saved["state_dict"][k], stopped[k]) for k in stopped)


def test_a_training_resume_refuses_a_changed_vae(tmp_path, capsys, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert run_script(*train_args(tmp_path, model, "--num_epochs=1")) == 0
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights)  # the same folder and config, other VAE weights
    assert run_script(*train_args(tmp_path, model, "--num_epochs=2", "--resume=True")) == 2
    assert "vae_fingerprint" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_a_real_sweep_cleanly(tmp_path, reward_model_path, predictor_path, signum):
    out = tmp_path / "out"
    args = sweep(out, reward_model_path, predictor_path, "--guidance", "5", "--num_images", "6", "--bs", "1",
                 "--num_inference_steps", "10")
    with open(tmp_path / "log", "w") as log:
        running = popen(*args, log=log)
        progress = out / "progress.json"
        wait_for(lambda: progress.exists() and json.loads(progress.read_text())["rows"], process=running)
        running.send_signal(signum)
        assert running.wait(timeout=120) == 130
    assert "interrupted: finished files are intact" in (tmp_path / "log").read_text()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written is kept
    assert run_script(*args, "--resume") == 0  # and the finished batches resume
    assert len(read_rows(out / "results.csv")) == 6
