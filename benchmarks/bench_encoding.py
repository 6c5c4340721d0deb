"""The latent cache: VAE encoding batched against one image at a time, and train.py's re-run encoding nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timing import ROOT, interleaved, paired_ratio, spread

from rcgdm.data import open_source
from rcgdm.latents import LatentSpec, encode
from rcgdm.models import load_vae


def bench_encode(model: str, device: torch.device, size: int, images: int, batch: int, repeats: int) -> dict:
    """Latent encoding throughput with the model's VAE: batched vs one image at a time."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = load_vae(model, dtype).to(device)
    source = open_source("synthetic")
    spec = LatentSpec("bench", source.identity, images, size, 0)
    times = interleaved(
        {
            "batched": lambda: encode(vae, source, spec, batch, device),
            "one_at_a_time": lambda: encode(vae, source, spec, 1, device),
        },
        repeats,
        device,
    )
    return {
        "model": model,
        "size": size,
        "images": images,
        "batch": batch,
        "images_per_second": {name: spread([images / t for t in ts]) for name, ts in times.items()},
        "speedup_batched": paired_ratio(times["one_at_a_time"], times["batched"]),
    }


def bench_train_py_cache(workdir: Path, num_data: int) -> dict:
    """train.py on the tiny model, twice with the same settings: the second run must encode nothing."""
    labels = workdir / "labels.npy"
    np.save(labels, np.zeros((num_data, 1), np.float32))
    runs = []
    for name in ("first", "rerun"):
        out = workdir / name
        argv = [
            "train.py", "--model=tiny-random", "--data=synthetic", f"--num_data={num_data}", "--image_size=64", "--num_epochs=1",
            "--val_fraction=0", f"--labels_path={labels}", f"--cache_dir={workdir / 'cache'}",
            f"--out_path={out / 'convnet.pth'}",
        ]
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((out / "convnet.train_summary.json").read_text())
        runs.append({"wall_seconds": wall, **{k: summary[k] for k in ("encode_seconds", "images_encoded")}})
    first, rerun = runs
    ratio = rerun["wall_seconds"] / first["wall_seconds"]
    return {"num_data": num_data, "first": first, "rerun": rerun, "ratio_rerun_vs_first": ratio}
