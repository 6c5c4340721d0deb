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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_encoding import bench_encode, bench_train_py_cache
from bench_report import report
from bench_sampling import bench_guidance, bench_images_per_second, bench_particles
from bench_streaming import bench_streaming
from bench_training import bench_training_loop
from timing import ROOT, machine

from rcgdm.demo import run_demo
from rcgdm.files.atomic import save_json, save_text


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
    section("particles", lambda: bench_particles(sd, device, size, steps, 4 if quick else 8, repeats))
    section("training_loop", lambda: bench_training_loop(device, 20 if quick else 100, 8 if quick else 64, repeats))
    section("streaming", lambda: bench_streaming(quick))
    with tempfile.TemporaryDirectory() as tmp:
        section("train_py_cache", lambda: bench_train_py_cache(Path(tmp), 8 if quick else 256))
        section("end_to_end", lambda: {"seconds": run_demo(Path(tmp) / "demo", quick=quick, paper_only=True)})
    results["total_seconds"] = time.perf_counter() - started
    return results


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
