"""Benchmarks: every performance claim of the project as ratios measured side by side in one run.

    python benchmarks/run.py            # `make bench`: ~10 minutes on a 2-core CPU; GPU figures too where CUDA is present
    python benchmarks/run.py --quick    # seconds on the tiny model: a smoke run, used by the test suite

Writes results.json and results.md (into --out, default benchmarks/). Each timing is repeated and
reported as min / median / max; ratios pair repeats run back to back, so drift on a shared machine
touches both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcgdm.data import open_source  # noqa: E402
from rcgdm.demo import run_demo  # noqa: E402
from rcgdm.files.atomic import save_json, save_text  # noqa: E402
from rcgdm.files.provenance import package_versions  # noqa: E402
from rcgdm.guidance import RewardGuidance  # noqa: E402
from rcgdm.latents import LatentSpec, encode  # noqa: E402
from rcgdm.memory import PeakMemory  # noqa: E402
from rcgdm.models import load_pipeline, load_scheduler, load_vae  # noqa: E402
from rcgdm.predictor import ThreeLayerConvNet  # noqa: E402
from rcgdm.sampler import sample_latents  # noqa: E402
from rcgdm.seeds import image_generators  # noqa: E402
from rcgdm.training import add_training_noise, train_epoch  # noqa: E402

PROMPT = "a nice photo"
TABLE_HEAD = ("| figure | value | goal | |", "| --- | --- | --- | --- |")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Warm each variant once, then time them in turn, `repeats` rounds."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return times


def paired_ratio(top: list[float], bottom: list[float]) -> dict[str, float]:
    return spread([a / b for a, b in zip(top, bottom, strict=True)])


def bench_guidance(model: str, device: torch.device, dtype: torch.dtype, size: int, steps: int, batch: int, repeats: int) -> dict:
    """Our sampler at guidance 0 vs the stock pipeline, and guided vs guidance 0: latents only (no decode)."""
    pipe = load_pipeline(model, dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    predictor = ThreeLayerConvNet().to(device).eval()

    def generators():
        return image_generators(0, range(batch))

    common = {"num_inference_steps": steps, "height": size, "width": size}
    variants = {
        "stock": lambda: pipe(PROMPT, num_images_per_prompt=batch, generator=generators(), output_type="latent", **common),
        "ours_g0": lambda: sample_latents(pipe, PROMPT, generators(), None, progress_bar=False, **common),
        "ours_guided": lambda: sample_latents(
            pipe, PROMPT, generators(), RewardGuidance(predictor, 1.0, 100.0), progress_bar=False, **common
        ),
    }
    times = interleaved(variants, repeats, device)
    memory = {}
    for name, fn in variants.items():
        with PeakMemory(device) as peak:
            fn()
        memory[name] = peak.used
    return {
        "model": model,
        "size": size,
        "steps": steps,
        "batch": batch,
        "dtype": str(dtype),
        "seconds": {name: spread(t) for name, t in times.items()},
        "ratio_g0_vs_stock": paired_ratio(times["ours_g0"], times["stock"]),
        "ratio_guided_vs_g0": paired_ratio(times["ours_guided"], times["ours_g0"]),
        "peak_memory_bytes": memory,
        "memory_ratio_guided_vs_g0": memory["ours_guided"] / max(memory["ours_g0"], 1),
    }


def bench_images_per_second(model: str, device: torch.device, size: int, steps: int, batch: int, repeats: int) -> dict:
    """GPU only: whole images (sampling and decoding), fp16, guided and unguided, and the stock pipeline."""
    from rcgdm.sampler import decode

    pipe = load_pipeline(model, torch.float16).to(device)
    pipe.set_progress_bar_config(disable=True)
    predictor = ThreeLayerConvNet().to(device).eval()

    def generators():
        return image_generators(0, range(batch))

    def ours(guidance):
        gens = generators()
        return decode(pipe, sample_latents(pipe, PROMPT, gens, guidance, steps, height=size, width=size,
            progress_bar=False), gens)

    variants = {
        "stock": lambda: pipe(PROMPT, num_images_per_prompt=batch, generator=generators(), num_inference_steps=steps,
                              height=size, width=size, output_type="pt"),
        "ours_unguided": lambda: ours(None),
        "ours_guided": lambda: ours(RewardGuidance(predictor, 1.0, 100.0)),
    }
    times = interleaved(variants, repeats, device)
    return {
        "size": size,
        "steps": steps,
        "batch": batch,
        "images_per_second": {name: spread([batch / t for t in ts]) for name, ts in times.items()},
        "ratio_guided_vs_unguided_time": paired_ratio(times["ours_guided"], times["ours_unguided"]),
        "ratio_unguided_vs_stock_time": paired_ratio(times["ours_unguided"], times["stock"]),
    }


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
    import numpy as np

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


class OriginalStyleDataset(torch.utils.data.Dataset):
    """What the original did: a per-sample Dataset of (latent, label), batched by a DataLoader."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int):
        return self.latents[index], self.labels[index]


def bench_training_loop(device: torch.device, num_data: int, latent_size: int, repeats: int) -> dict:
    """Optimizer steps per second: train_epoch on memory-resident latents vs a per-sample Dataset + DataLoader."""
    scheduler = load_scheduler("tiny-random")
    scheduler.set_timesteps(50)
    pool = torch.unique(scheduler.timesteps)
    latents = torch.randn(num_data, 4, latent_size, latent_size)
    labels = torch.randn(num_data, 1)
    net = ThreeLayerConvNet().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = latents.to(device), labels.to(device)
    steps = -(-num_data // 10)

    def ours():
        train_epoch(net, optimizer, scheduler, x, y, pool, torch.Generator().manual_seed(0), 10, "bench")

    def original():
        loader = torch.utils.data.DataLoader(OriginalStyleDataset(latents, labels), batch_size=10, shuffle=True)
        generator = torch.Generator().manual_seed(0)
        net.train()
        for batch_latents, batch_labels in loader:
            batch_latents, batch_labels = batch_latents.to(device), batch_labels.to(device)
            noisy, _, _ = add_training_noise(scheduler, batch_latents, pool, generator)
            loss = F.mse_loss(net(noisy), batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the original logged every step

    times = interleaved({"ours": ours, "original_style": original}, repeats, device)
    return {
        "num_data": num_data,
        "latent_size": latent_size,
        "batch": 10,
        "steps_per_second": {name: spread([steps / t for t in ts]) for name, ts in times.items()},
        "speedup_ours": paired_ratio(times["original_style"], times["ours"]),
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    info["versions"] = package_versions()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(quick: bool, only: set[str] | None = None) -> dict:
    cpu = torch.device("cpu")
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    device = cuda or cpu
    sd = "tiny-random" if quick else "sd15-random"
    results: dict = {"machine": machine(), "quick": quick, "device": str(device), "sections": {}}
    sections = results["sections"]
    started = time.perf_counter()

    def section(name: str, fn: Callable[[], dict]) -> None:
        if only is not None and name not in only:
            return
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        sections[name] = {**fn(), "bench_seconds": time.perf_counter() - start}

    repeats = 1 if quick else 3
    if cuda is not None:  # SD's own size and steps
        size, steps = (64, 2) if quick else (512, 50)
        section("guidance", lambda: bench_guidance(sd, cuda, torch.float16, size, steps, 1, repeats))
        section("images_per_second", lambda: bench_images_per_second(sd, cuda, size, steps, 4, repeats))
        section("encode", lambda: bench_encode(sd, cuda, size, 8 if quick else 64, 8 if quick else 16, repeats))
    else:  # sizes that keep a 2-core CPU within minutes
        size, steps = (64, 2) if quick else (192, 3)
        section("guidance", lambda: bench_guidance(sd, cpu, torch.float32, size, steps, 1, repeats))
        section("encode", lambda: bench_encode(sd, cpu, 64 if quick else 128, 4 if quick else 8, 4 if quick else 8, repeats))
    section("training_loop", lambda: bench_training_loop(device, 20 if quick else 100, 8 if quick else 64, repeats))
    with tempfile.TemporaryDirectory() as tmp:
        section("train_py_cache", lambda: bench_train_py_cache(Path(tmp), 8 if quick else 256))
        section("end_to_end", lambda: {"seconds": run_demo(Path(tmp) / "demo", quick=quick, paper_only=True)})
    results["total_seconds"] = time.perf_counter() - started
    return results


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n={s['n']})"


def verdict(value: float, goal: float, lower_is_better: bool = True) -> str:
    met = value <= goal if lower_is_better else value >= goal
    return "met" if met else "**missed**"


def row(label: str, ratio: dict, goal: float, lower_is_better: bool = True) -> str:
    """A table row for a ratio judged on its median."""
    sign = "<=" if lower_is_better else ">="
    return f"| {label} | {fmt(ratio)} | {sign} {goal} | {verdict(ratio['median'], goal, lower_is_better)} |"


def mib(section: dict, name: str) -> str:
    return f"{section['peak_memory_bytes'][name] / 2**20:.0f}"


def report(results: dict, gpu: dict | None) -> str:
    """results.md: every figure with its goal beside it."""
    s = results["sections"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python benchmarks/run.py{' --quick' if results['quick'] else ''}`); "
        f"device `{results['device']}`, total {results['total_seconds']:.0f} s.",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, Python {results['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items() if k != "python"),
        "",
        "Timings are medians with (min, max, n) over interleaved repeats; ratios pair repeats run back to back.",
        "",
    ]
    g = s["guidance"]
    lines += [
        f"## Guidance overhead ({g['model']}, {g['size']}x{g['size']}, {g['steps']} steps, batch {g['batch']}, {g['dtype']})",
        "",
        "Sampling loop only (latents out, no decode); classifier-free guidance 7.5, PNDM.",
        "",
        *TABLE_HEAD,
        f"| stock `StableDiffusionPipeline` (s) | {fmt(g['seconds']['stock'])} | | |",
        f"| ours, guidance 0 (s) | {fmt(g['seconds']['ours_g0'])} | | |",
        f"| ours, guidance 100 (s) | {fmt(g['seconds']['ours_guided'])} | | |",
        row("ours at guidance 0 / stock", g["ratio_g0_vs_stock"], 1.05),
        row("guided / guidance 0", g["ratio_guided_vs_g0"], 1.05),
        f"| peak memory, guided / guidance 0 | {g['memory_ratio_guided_vs_g0']:.3f} ({mib(g, 'ours_guided')} / "
        f"{mib(g, 'ours_g0')} MiB above the start) | <= 1.10 | {verdict(g['memory_ratio_guided_vs_g0'], 1.10)} |",
        "",
    ]
    e, c = s["encode"], s["train_py_cache"]
    lines += [
        "## Latent cache",
        "",
        *TABLE_HEAD,
        f"| train.py first run, wall (s) | {c['first']['wall_seconds']:.1f} ({c['first']['images_encoded']} images encoded, "
        f"latents ready in {c['first']['encode_seconds']:.1f} s) | | |",
        f"| train.py re-run, wall (s) | {c['rerun']['wall_seconds']:.1f} ({c['rerun']['images_encoded']} images encoded, "
        f"latents ready in {c['rerun']['encode_seconds']:.1f} s) | 0 images encoded | "
        f"{verdict(c['rerun']['images_encoded'], 0)} |",
        f"| re-run / first run, wall | {c['ratio_rerun_vs_first']:.3f} | < 1 | {verdict(c['ratio_rerun_vs_first'], 0.999)} |",
        f"| encode, batched ({e['batch']}) (img/s) | {fmt(e['images_per_second']['batched'], 2)} | | |",
        f"| encode, one at a time (img/s) | {fmt(e['images_per_second']['one_at_a_time'], 2)} | | |",
        f"| batched / one at a time | {fmt(e['speedup_batched'])} | (informational) | |",
        "",
        f"Encoding: {e['model']} VAE, {e['images']} images at {e['size']}x{e['size']}; "
        f"train.py: tiny model, {c['num_data']} images, 1 epoch.",
        "",
    ]
    t = s["training_loop"]
    lines += [
        f"## Training loop ({t['num_data']} latents of 4x{t['latent_size']}x{t['latent_size']}, batch {t['batch']})",
        "",
        *TABLE_HEAD,
        f"| ours: `train_epoch` on memory-resident latents (steps/s) | {fmt(t['steps_per_second']['ours'], 2)} | | |",
        f"| original style: per-sample Dataset + DataLoader (steps/s) | {fmt(t['steps_per_second']['original_style'], 2)} | | |",
        f"| ours / original style | {fmt(t['speedup_ours'])} | (informational) | |",
        "",
        "On a 2-core CPU both loops wait on the same convolutions; the loader's overhead shows on a GPU (below).",
        "",
        "## End to end: the demo's three steps (wall seconds)",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {name} | {sec:.1f} |" for name, sec in s["end_to_end"]["seconds"].items()],
        "",
        "## GPU",
        "",
    ]
    if "images_per_second" in s:
        gpu = results
    if gpu is None:
        lines += ["No GPU was lent for this run: no GPU figures are reported."]
    else:
        ips = gpu["sections"]["images_per_second"]
        gg, ge, gt = (gpu["sections"][name] for name in ("guidance", "encode", "training_loop"))
        lines += [
            f"Measured on {gpu['machine'].get('gpu')} by the same script (`results-gpu.json`): sd15-random, "
            f"{ips['size']}x{ips['size']}, fp16, {ips['steps']} steps, batch {ips['batch']}, decode included.",
            "",
            *([f"_{gpu['note']}_", ""] if gpu.get("note") else []),
            *TABLE_HEAD,
            f"| stock pipeline (img/s) | {fmt(ips['images_per_second']['stock'], 2)} | | |",
            f"| ours, unguided (img/s) | {fmt(ips['images_per_second']['ours_unguided'], 2)} | | |",
            f"| ours, guided (img/s) | {fmt(ips['images_per_second']['ours_guided'], 2)} | | |",
            row("unguided / stock, time", ips["ratio_unguided_vs_stock_time"], 1.05),
            row("guided / unguided, time", ips["ratio_guided_vs_unguided_time"], 1.05),
            row(f"sampling loop at batch {gg['batch']}, ours at guidance 0 / stock", gg["ratio_g0_vs_stock"], 1.05),
            f"| encode, batched ({ge['batch']}) / one at a time, {ge['size']}x{ge['size']} fp16 | {fmt(ge['speedup_batched'])} "
            "| (informational) | |",
            f"| training loop, ours / original style | {fmt(gt['speedup_ours'])} | (informational) | |",
            row(f"sampling loop at batch {gg['batch']}, guided / guidance 0", gg["ratio_guided_vs_g0"], 1.05),
            f"| peak memory, guided / guidance 0 | {gg['memory_ratio_guided_vs_g0']:.3f} | <= 1.10 | "
            f"{verdict(gg['memory_ratio_guided_vs_g0'], 1.10)} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, smallest sizes: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder for results.json / results.md")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all); writes JSON only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(args.quick, set(args.only.split(",")) if args.only else None)
    name = "results-gpu" if torch.cuda.is_available() else "results"
    save_json(results, out / f"{name}.json")
    if args.only:
        print(f"[bench] wrote {out / (name + '.json')} (sections {args.only}) in {results['total_seconds']:.0f} s")
        return
    gpu_file = ROOT / "benchmarks" / "results-gpu.json"
    gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() and not args.quick else None
    save_text(report(results, gpu), out / f"{name}.md")
    print(f"[bench] wrote {out / (name + '.md')} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
