"""The offline demo: the paper's three steps on the tiny model, synthetic images and a random-backbone reward.

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
    """The three commands, step name -> argv (after the Python executable)."""
    num_data, epochs, images, steps = (16, 1, 1, 2) if quick else (256, 5, 4, 20)
    labels = out / "cifar10_outputs_with_noise.npy"
    return {
        "fake_dataset": [
            "fake_dataset.py", "--data", "synthetic", "--num_data", str(num_data), "--weights", "none", "--out_dir", str(out),
        ],
        "train": [
            "train.py", "--model=tiny", "--data=synthetic", f"--num_data={num_data}", "--image_size=64", f"--num_epochs={epochs}",
            "--val_fraction=0.25", f"--labels_path={labels}", f"--out_path={out / 'convnet.pth'}", f"--cache_dir={out / 'cache'}",
        ],
        "inference": [
            "inference.py", "--model", "tiny",
            "--reward_model", str(out / "reward_model.pth"), "--predictor", str(out / "convnet.pth"),
            "--prompt", *FIGURE6_PROMPTS, "--target", "2", "4", "6", "8", "10", "--guidance", "100",
            "--num_images", str(images), "--bs", "4", "--seed", "0", "--num_inference_steps", str(steps),
            "--out_dir", str(out / "figure6"), "--overwrite",
        ],
    }  # fmt: skip


def run_demo(out: str | Path = "demo_out", quick: bool = False) -> dict[str, float]:
    """Run the three steps in order, each as a user would; -> wall seconds per step."""
    out = Path(out)
    seconds = {}
    for name, argv in demo_steps(out, quick).items():
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
    print(f"figures: {out / 'figure6' / 'grid.png'}, {out / 'figure6' / 'reward_vs_target.png'}, {out / 'loss_curve.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
