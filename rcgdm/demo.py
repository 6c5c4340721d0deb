"""The offline demo: the paper's three steps on the trained tiny model, synthetic images and a
random-backbone reward; rcgdm.steer inside diffusers' image-to-image pipeline; then the same with the
compressibility reward, ending in a guidance vs best-of-N sweep. Each step is run as a user would run it,
then the demo prints the numbers that show it worked, writes them to `demo_report.json` and copies the
figures into asset/.

    python -m rcgdm.demo [OUT_DIR]          # what `make demo` runs (OUT_DIR defaults to demo_out)
    python -m rcgdm.demo OUT_DIR --quick    # seconds: the smallest sizes, for smoke tests and benchmarks

The sweep's targets are the label mean + (-2, -1, 0, 1, 2) label std, read from step 1's labels. The
effect is measured on the unconditional prompt "", whose unguided samples follow the data the labels
describe; the two captions show it on prompted images (the grid's rows). The same sweep runs
`--guidance auto` and `posterior` beside the fixed strength (not with --quick), and the demo compares them per
prompt, beside the theory's E[r | y = a].
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcgdm.demo_numbers import (
    LABELS,
    calibrated_numbers,
    effect_numbers,
    methods_compared,
    prompt_colours,
    result_rows,
    theory_rewards,
    training_numbers,
)
from rcgdm.files import run_folder
from rcgdm.files.atomic import copy_file, save_json

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["", "a yellow circle on a blue background", "a white square on a red background"]
GUIDANCE = 150.0  # the demo's strength: rewards follow the target, images stay shapes
BREAKDOWN_GUIDANCE = (0.0, 150.0, 600.0, 2400.0)  # at the top target: where image quality breaks down
CFG = 3.0  # classifier-free guidance: the tiny model's samples are clean at 2-4 and oversaturated at SD's 7.5
COMPRESSIBILITY_GUIDANCE = 40.0  # its labels span ~4x the ResNet's: the same pull needs less strength
TARGET_STDS = (-2, -1, 0, 1, 2)
PARTICLES = 8  # per guided image in the particle step: 8x the UNet calls of one sample
STEER_STRENGTH = 0.7  # image-to-image in the steer step: the share of the schedule denoised again


@dataclass(frozen=True)
class Sizes:
    num_data: int = 2048
    epochs: int = 50
    images: int = 8
    steps: int = 20


QUICK = Sizes(num_data=16, epochs=1, images=1, steps=2)
COMPRESSIBILITY = Sizes(num_data=1024, epochs=30)  # its effect is a direction only: a smaller run


def run(name: str, argv: list[str], seconds: dict[str, float]) -> None:
    """One script, as a user runs it (fails the demo if it fails)."""
    print(f"\n=== {name}: python3 {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)
    seconds[name] = time.perf_counter() - start


def fake_dataset(folder: Path, reward: str, sizes: Sizes) -> list[str]:
    return ["fake_dataset.py", "--data", "synthetic", "--num_data", str(sizes.num_data), "--weights", "none",
            "--reward", reward, "--out_dir", str(folder), "--overwrite"]


PREDICTORS = {"paper": "convnet.pth", "calibrated": "convnet_calibrated.pth"}  # train.py's predictor -> its file


def train(folder: Path, cache: Path, sizes: Sizes, predictor: str = "paper") -> list[str]:
    return ["train.py", "--model=tiny", "--data=synthetic", f"--num_data={sizes.num_data}", "--image_size=32",
            f"--num_epochs={sizes.epochs}", "--batch_size=32", "--val_fraction=0.25", f"--labels_path={folder / LABELS}",
            f"--out_path={folder / PREDICTORS[predictor]}", f"--cache_dir={cache}", "--overwrite=True",
            f"--predictor={predictor}"]


def inference(folder: Path, out_dir: Path, sizes: Sizes, *sweep: str, predictor: str = "paper") -> list[str]:
    return ["inference.py", "--model", "tiny", "--reward_model", str(folder / "reward_model.pth"),
            "--predictor", str(folder / PREDICTORS[predictor]), *sweep, "--bs", "8", "--seed", "0", "--cfg", f"{CFG:g}",
            "--num_images", str(sizes.images), "--num_inference_steps", str(sizes.steps), "--overwrite",
            "--out_dir", str(out_dir)]


def label_stats(folder: Path) -> tuple[float, float]:
    labels = np.load(folder / LABELS, allow_pickle=False)
    return float(labels.mean()), float(labels.std())


def targets(mean: float, std: float) -> list[str]:
    return [f"{mean + k * std:.3f}" for k in TARGET_STDS]


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def breakdown_figure(folder: Path, path: Path) -> None:
    """Rows: images 0..3 of the top target; columns: rising guidance. Where the shapes dissolve is where to stop."""
    from rcgdm.files.png import load_png
    from rcgdm.plots import image_grid

    rows = result_rows(folder)
    levels = sorted({float(r["guidance"]) for r in rows})
    images = sorted({int(r["image"]) for r in rows})[:4]
    cell = {(int(r["image"]), float(r["guidance"])): r for r in rows}
    grid = [[load_png(folder / cell[i, g]["file"]) for g in levels] for i in images]
    captions = [[f"gt {float(cell[i, g]['gt']):.2f} / shift {float(cell[i, g]['shift']):.2f}" for g in levels] for i in images]
    image_grid([f"image {i}" for i in images], [f"guidance {g:g}" for g in levels], grid, captions, path)


def run_demo(out: str | Path = "demo_out", quick: bool = False, paper_only: bool = False) -> dict[str, float]:
    """Every step in order (paper_only: the paper's three); prints and writes demo_report.json -> wall seconds per step."""
    out, sizes, seconds = Path(out), QUICK if quick else Sizes(), {}
    report: dict = {"sizes": vars(sizes)}

    run("fake_dataset", fake_dataset(out, "resnet18-random", sizes), seconds)
    mean, std = label_stats(out)
    report["labels"] = {"mean": mean, "std": std}
    print(f"--> labels: mean {mean:.4f}, std {std:.4f}; the sweep's targets: {', '.join(targets(mean, std))}")

    run("train", train(out, out / "cache", sizes), seconds)
    report["training"] = training_numbers(out)
    lowest = report["training"]["lowest_noise_val_vs_baseline"]
    print(f"--> predictor: validation loss {report['training']['val_vs_baseline']:.2f}x predict-the-mean over all "
          f"timesteps" + ("" if lowest is None else f", {lowest:.2f}x on the least noisy bucket"))

    figure6 = out / "figure6"
    auto = not (quick or paper_only)  # beyond the paper, and a search: not in smoke runs
    sweep = ["--prompt", *PROMPTS, "--target", *targets(mean, std), "--guidance", "0", f"{GUIDANCE:g}",
             *["auto", "posterior"] * auto]
    run("inference", inference(out, figure6, sizes, *sweep), seconds)
    report["effect"] = {prompt: effect_numbers(figure6, mean, std, GUIDANCE, prompt) for prompt in PROMPTS}
    report["methods"] = {prompt: methods_compared(figure6, std, GUIDANCE, prompt) for prompt in PROMPTS} if auto else {}
    report["theory_reward_per_target"] = theory_rewards(out, mean, std, targets(mean, std))
    report["prompt_colours"] = prompt_colours(figure6)
    for prompt, e in report["effect"].items():
        print(f"--> {prompt or '(unconditional)'!s} at guidance {GUIDANCE:g}: ground truth per target "
              f"{', '.join(f'{v:.3f}' for v in e['gt_mean_per_target'])}; Spearman {_number(e['spearman'])}; top - bottom "
              f"{e['top_minus_bottom_in_label_std']:.2f} label std; unguided mean {e['unguided_offset_in_label_std']:+.2f} "
              "label std from the label mean")
    for prompt, methods in report["methods"].items():
        print(f"--> {prompt or '(unconditional)'!s}, ground truth per target (theory's E[r | y = a] "
              f"{', '.join(f'{v:.3f}' for v in report['theory_reward_per_target'])}): " + "; ".join(
                  f"{name} {', '.join(f'{v:.3f}' for v in m['gt_mean_per_target'])}" for name, m in methods.items()))
        print(f"--> {prompt or '(unconditional)'!s}: " + "; ".join(
            f"guidance {name}: |ground truth - target| {m['mean_abs_target_error']:.3f}, MMD^2 to unguided "
            f"{_number(m['mean_mmd_to_unguided'], 3)}, spread across targets {m['gt_spread_in_label_std']:.2f} label std, "
            f"{m['unet_calls']:.0f} UNet calls" + (f" ({m['unreachable']} targets unreachable)" if m["unreachable"] else "")
            for name, m in methods.items()))
    if auto:
        run_calibrated(out, sizes, seconds, report)
        run_particles(out, sizes, seconds, report)
    if not paper_only:
        run_steer(out, sizes, seconds, report)
        top = targets(mean, std)[-1]
        levels = [f"{g:g}" for g in BREAKDOWN_GUIDANCE]
        run("breakdown", inference(out, out / "breakdown", sizes, "--prompt", PROMPTS[0], "--target", top, "--guidance", *levels),
            seconds)
        breakdown_figure(out / "breakdown", out / "breakdown" / "guidance_breakdown.png")
        run_compressibility(out, QUICK if quick else COMPRESSIBILITY, seconds, report)
    report["seconds"] = seconds
    save_json(report, out / "demo_report.json")
    return seconds


def run_calibrated(out: Path, sizes: Sizes, seconds: dict, report: dict) -> None:
    """The calibrated predictor (train.py predictor="calibrated") on the same labels, and its posterior on the prompt ""
    at the same targets, beside the unguided images."""
    mean, std = report["labels"]["mean"], report["labels"]["std"]
    run("train: calibrated", train(out, out / "cache", sizes, "calibrated"), seconds)
    sweep = ["--prompt", PROMPTS[0], "--target", *targets(mean, std), "--guidance", "0", "posterior"]
    run("inference: calibrated", inference(out, out / "calibrated", sizes, *sweep, predictor="calibrated"), seconds)
    numbers = report["calibrated"] = calibrated_numbers(out / "calibrated", std,
                                                        out / "convnet_calibrated.train_summary.json")
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in numbers["calibration_by_noise"].items() if v is not None)
    print(f"--> calibrated posterior, (unconditional): ground truth per target "
          f"{', '.join(f'{v:.3f}' for v in numbers['gt_mean_per_target'])} (predicted "
          f"{', '.join(f'{v:.3f}' for v in numbers['predicted_mean_per_target'])}); spread across targets "
          f"{numbers['gt_spread_in_label_std']:.2f} label std; predicted variance / squared error by noise level {ratios}")


def run_particles(out: Path, sizes: Sizes, seconds: dict, report: dict) -> None:
    """The paper's predictor at the demo's strength with PARTICLES particles per image (rcgdm/sampling/particles.py: DDPM steps)
    on the prompt "" at the same targets, beside unguided DDPM images."""
    mean, std = report["labels"]["mean"], report["labels"]["std"]
    sweep = ["--prompt", PROMPTS[0], "--target", *targets(mean, std), "--guidance", "0", f"{GUIDANCE:g}", "--scheduler",
             "ddpm", "--particles", str(PARTICLES)]
    run("inference: particles", inference(out, out / "particles", sizes, *sweep), seconds)
    strength = f"{GUIDANCE:g}"
    numbers = report["particles"] = methods_compared(out / "particles", std, GUIDANCE, PROMPTS[0], (strength,))[strength]
    print(f"--> {PARTICLES} particles at guidance {strength}, (unconditional): ground truth per target "
          f"{', '.join(f'{v:.3f}' for v in numbers['gt_mean_per_target'])}; |ground truth - target| "
          f"{numbers['mean_abs_target_error']:.3f}, MMD^2 to unguided {_number(numbers['mean_mmd_to_unguided'], 3)}, "
          f"{numbers['unet_calls']:.0f} UNet calls")


def run_steer(out: Path, sizes: Sizes, seconds: dict, report: dict) -> None:
    """rcgdm.steer inside diffusers' own StableDiffusionImg2ImgPipeline, as the README's example: the tiny model's
    unguided images of "" denoised again from STEER_STRENGTH, unguided and steered at the demo's strength toward the
    lowest and the highest target, scored by the ground-truth reward."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from rcgdm import steer
    from rcgdm.models import load_pipeline
    from rcgdm.rewards import load_reward
    from rcgdm.seeds import image_generators

    print(f"\n=== steer: diffusers' StableDiffusionImg2ImgPipeline, strength {STEER_STRENGTH:g}", flush=True)
    start_time, mean, std = time.perf_counter(), report["labels"]["mean"], report["labels"]["std"]
    base = load_pipeline("tiny")
    base.set_progress_bar_config(disable=True)
    settings = {"num_inference_steps": sizes.steps, "guidance_scale": CFG, "output_type": "pt"}
    start = base([""] * sizes.images, generator=image_generators(0, range(sizes.images)), **settings).images
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    reward, _ = load_reward(out / "reward_model.pth")

    def ground_truth() -> float:
        images = pipe([""] * sizes.images, image=start, strength=STEER_STRENGTH,
                      generator=image_generators(0, range(sizes.images)), **settings).images
        with torch.no_grad():
            return reward(images).mean().item()

    unguided, steered = ground_truth(), {}
    for target in (targets(mean, std)[0], targets(mean, std)[-1]):
        with steer(pipe, out / "convnet.pth", float(target), GUIDANCE):
            steered[target] = ground_truth()
    seconds["steer"] = time.perf_counter() - start_time
    report["steer"] = {"strength": STEER_STRENGTH, "gt_mean_unguided": unguided, "gt_mean_per_target": steered}
    print(f"--> steer, image-to-image at guidance {GUIDANCE:g}: ground truth {unguided:.3f} unguided, "
          + ", ".join(f"{v:.3f} toward {t}" for t, v in steered.items()))


def run_compressibility(out: Path, sizes: Sizes, seconds: dict, report: dict) -> None:
    comp = out / "compressibility"
    run("compressibility: fake_dataset", fake_dataset(comp, "compressibility", sizes), seconds)
    mean, std = label_stats(comp)
    run("compressibility: train", train(comp, out / "cache", sizes), seconds)
    low, high = targets(mean, std)[0], targets(mean, std)[-1]
    sweep = ["--target", low, high, "--guidance", "0", f"{COMPRESSIBILITY_GUIDANCE:g}", "--best_of", "1", "2", "4"]
    run("compressibility: inference", inference(comp, comp / "sweep", sizes, *sweep), seconds)
    combos = json.loads((comp / "sweep" / "summary.json").read_text())["combinations"]
    gt = {c["target"]: c["gt_mean"] for c in combos if c["guidance"] == COMPRESSIBILITY_GUIDANCE and c["best_of"] == 1}
    report["compressibility"] = {
        "labels": {"mean": mean, "std": std},
        "gt_mean_at_low_and_high_target": [gt[min(gt)], gt[max(gt)]],
        **training_numbers(comp),
    }
    print(f"--> compressibility at guidance {COMPRESSIBILITY_GUIDANCE:g}: ground truth {gt[min(gt)]:.3f} at target {min(gt):g}, "
          f"{gt[max(gt)]:.3f} at target {max(gt):g} (labels: mean {mean:.3f}, std {std:.3f})")


ASSETS = {
    "figure6/grid.png": "tiny_demo_grid.png",
    "figure6/reward_vs_target.png": "tiny_demo_reward_vs_target.png",
    "figure6/shift_vs_target.png": "tiny_demo_shift_vs_target.png",
    "figure6/reward_vs_distance.png": "tiny_demo_reward_vs_distance.png",
    "breakdown/guidance_breakdown.png": "tiny_demo_guidance_breakdown.png",
    "convnet.loss_curve.png": "tiny_demo_loss_curve.png",
    "convnet.loss_by_noise.png": "tiny_demo_loss_by_noise.png",
    "compressibility/sweep/reward_vs_compute.png": "tiny_demo_reward_vs_compute.png",
}


def copy_assets(out: Path, assets: Path = ROOT / "asset") -> None:
    """ASSETS into `assets`, published together (rcgdm/files/run_folder.py): never half of one run's figures."""
    staging = run_folder.make_staging(assets, "demo")
    try:
        for source, name in ASSETS.items():
            copy_file(out / source, staging / name)
        run_folder.publish(assets, "demo", ASSETS.values(), run_folder.earlier_files(assets, "demo", ASSETS.values()))
    finally:
        run_folder.remove_staging(staging)
    print(f"figures copied into {assets}")


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    out = Path(next((a for a in argv if a != "--quick"), "demo_out")).resolve()
    try:
        seconds = run_demo(out, quick)
    except subprocess.CalledProcessError as err:
        sys.exit(f"demo step failed with exit status {err.returncode}")
    if not quick:
        copy_assets(out)
    print("\ndemo done: " + ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items()))
    print(f"numbers: {out / 'demo_report.json'}")
    print(f"figures: {out / 'figure6'}, {out / 'breakdown'}, {out}, {out / 'compressibility' / 'sweep'}")


if __name__ == "__main__":
    main(sys.argv[1:])
