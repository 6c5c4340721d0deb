"""results.md: every benchmark figure beside its goal, one section per benchmark."""

from __future__ import annotations

TABLE_HEAD = ("| figure | value | goal | |", "| --- | --- | --- | --- |")


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
    """results.md: every figure with its goal beside it (`gpu`: the GPU run's results, when one was made)."""
    s = results["sections"]
    if "images_per_second" in s:
        gpu = results
    lines = [*header_lines(results), *guidance_lines(s["guidance"]), *particle_lines(s["particles"]),
             *cache_lines(s["encode"], s["train_py_cache"]),
             *training_lines(s["training_loop"], s["end_to_end"]), *streaming_lines(s["streaming"]), *gpu_lines(gpu)]
    return "\n".join(lines) + "\n"


def header_lines(results: dict) -> list[str]:
    return [
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


def guidance_lines(g: dict) -> list[str]:
    return [
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


def particle_lines(p: dict) -> list[str]:
    return [
        f"## Particles ({p['model']}, {p['size']} px, {p['steps']} DDPM steps, K = {p['particles']})",
        "",
        "One image from K particles (rcgdm/sampling/particles.py), its K denoised in one batch, against K images sampled "
        "plainly.",
        "",
        *TABLE_HEAD,
        f"| K images, unguided (s) | {fmt(p['seconds']['unguided_k_images'])} | | |",
        f"| K images, guided (s) | {fmt(p['seconds']['guided_k_images'])} | | |",
        f"| one image from K particles (s) | {fmt(p['seconds']['one_image_k_particles'])} | | |",
        row("K particles / K unguided images", p["ratio_particles_vs_unguided"], 1.05),
        row("K particles / K guided images", p["ratio_particles_vs_guided"], 1.05),
        "",
    ]


def cache_lines(e: dict, c: dict) -> list[str]:
    return [
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


def training_lines(t: dict, end_to_end: dict) -> list[str]:
    return [
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
        *[f"| {name} | {sec:.1f} |" for name, sec in end_to_end["seconds"].items()],
        "",
    ]


def streaming_lines(t: dict) -> list[str]:
    """Training from a cache 4x a memory budget: streamed from its shards against held in memory."""
    mb = 2**20
    rss, before = t["peak_rss_bytes"], t["rss_before_bytes"]
    above = {mode: (rss[mode] - before[mode]) / mb for mode in rss}
    budget, growth = t["budget_bytes"] / mb, rss["streamed"] / rss["streamed_small_cache"]
    speed = t["ratio_streamed_vs_in_memory_speed"]
    return [
        f"## Training past memory: a {t['cache_bytes'] / mb:.0f} MiB latent cache, budget {budget:.0f} MiB",
        "",
        f"{t['images']} latents of {'x'.join(map(str, t['latent_shape']))} in shards of 1024; `train_epoch`, {t['steps']} "
        f"steps of {t['batch']} rows drawn from the whole cache; each side in a fresh process, {t['repeats']} rounds in "
        "turn. Peak RSS is the process's; 'above start' subtracts its peak after one warm-up training step (torch, the "
        "model, a step's own memory).",
        "",
        *TABLE_HEAD,
        *[f"| {label}: steps/s | {fmt(t['steps_per_second'][mode], 2)} | | |" for mode, label in _STREAMING_LABELS.items()],
        *[f"| {label}: peak RSS (MiB) | {rss[mode] / mb:.0f} ({above[mode]:.0f} above start) | | |"
          for mode, label in _STREAMING_LABELS.items()],
        f"| streamed: latents' memory above start (MiB) | {above['streamed']:.0f} | <= budget {budget:.0f} | "
        f"{verdict(above['streamed'], budget)} |",
        f"| streamed peak RSS, whole cache / quarter cache | {growth:.3f} | <= 1.05 (no growth) | {verdict(growth, 1.05)} |",
        f"| streamed / in memory, steps/s | {speed:.3f} | >= 0.9 | {verdict(speed, 0.9, lower_is_better=False)} |",
        "",
    ]


_STREAMING_LABELS = {"in_memory": "in memory (whole cache)", "streamed": "streamed from the shards",
                     "streamed_small_cache": "streamed, a quarter-size cache"}


def gpu_lines(gpu: dict | None) -> list[str]:
    lines = ["## GPU", ""]
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
    return lines
