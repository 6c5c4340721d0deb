"""The offline demo: the paper's three steps on the tiny model, synthetic images and a random-backbone
reward; then the same with the compressibility reward, ending in a guidance vs best-of-N sweep.

    python -m rcgdm.demo [OUT_DIR]          # what `make demo` runs (OUT_DIR defaults to demo_out)
    python -m rcgdm.demo OUT_DIR --quick    # seconds: the smallest sizes, for smoke tests and benchmarks
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE6_PROMPTS = ["A cat with a glass of water.", "An astronaut on the horseback"]


def demo_steps(out: Path, quick: bool = False) -> dict[str, list[str]]:
    """The commands, step name -> argv (after the Python executable)."""
    num_data, epochs, images, steps = (16, 1, 1, 2) if quick else (256, 5, 4, 20)
    comp = out / "compressibility"

    def step1(folder: Path, reward: str) -> list[str]:
        return ["fake_dataset.py", "--data", "synthetic", "--num_data", str(num_data), "--weights", "none",
                "--reward", reward, "--out_dir", str(folder)]  # fmt: skip

    def step2(folder: Path) -> list[str]:
        return ["train.py", "--model=tiny", "--data=synthetic", f"--num_data={num_data}", "--image_size=64",
                f"--num_epochs={epochs}", "--val_fraction=0.25", f"--labels_path={folder / 'cifar10_outputs_with_noise.npy'}",
                f"--out_path={folder / 'convnet.pth'}", f"--cache_dir={out / 'cache'}"]  # fmt: skip

    def step3(folder: Path, *sweep: str) -> list[str]:
        return ["inference.py", "--model", "tiny", "--reward_model", str(folder / "reward_model.pth"),
                "--predictor", str(folder / "convnet.pth"), *sweep, "--bs", "4", "--seed", "0",
                "--num_images", str(images), "--num_inference_steps", str(steps), "--overwrite"]  # fmt: skip

    return {
        "fake_dataset": step1(out, "resnet18-random"),
        "train": step2(out),
        "inference": step3(out, "--prompt", *FIGURE6_PROMPTS, "--target", "2", "4", "6", "8", "10", "--guidance", "100",
                           "--out_dir", str(out / "figure6")),
        "compressibility: fake_dataset": step1(comp, "compressibility"),
        "compressibility: train": step2(comp),
        "compressibility: inference": step3(comp, "--target", "-2", "--guidance", "0", "50", "100", "--best_of", "1", "2", "4",
                                            "--out_dir", str(comp / "sweep")),
    }  # fmt: skip


def run_demo(out: str | Path = "demo_out", quick: bool = False, paper_only: bool = False) -> dict[str, float]:
    """Run the steps in order, each as a user would (paper_only: the paper's three); -> wall seconds per step."""
    out = Path(out)
    seconds = {}
    steps = demo_steps(out, quick)
    for name, argv in list(steps.items())[: 3 if paper_only else None]:
        print(f"\n=== {name}: python3 {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    out = Path(next((a for a in argv if a != "--quick"), "demo_out")).resolve()
    try:
        seconds = run_demo(out, quick)
    except subprocess.CalledProcessError as err:
        sys.exit(f"demo step failed with exit status {err.returncode}")
    print("\ndemo done: " + ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items()))
    print(f"figures: {out / 'figure6' / 'grid.png'}, {out / 'figure6' / 'reward_vs_target.png'}, {out / 'loss_curve.png'},")
    print(f"         {out / 'compressibility' / 'sweep' / 'reward_vs_compute.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
