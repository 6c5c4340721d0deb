"""Step 1 of the paper: a random "ground-truth" reward and noisy reward labels for a dataset.

The paper's reward is ImageNet ResNet18 with its last layer replaced by a random Linear(512, 1);
--reward picks another (compressibility, aesthetic, or your module:function; see rcgdm/rewards/).
Each image i (resized to 224) gets the label reward(image_i) + N(0, noise_std^2).

    python3 fake_dataset.py                                      # the paper: CIFAR-10 train, 50k
    python3 fake_dataset.py --data synthetic --num_data 64 --weights none --out_dir OUT   # offline

Writes, in --out_dir:
    reward_model.pth                 state_dict + metadata (torch.load(weights_only=True))
    cifar10_outputs_with_noise.npy   float32, shape (N, 1), row i = image i
    cifar10_outputs_with_noise.json  provenance: data, N, noise std, seed, weights, sha256, versions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from rcgdm import distributed, rewards
from rcgdm.cli import (
    ArgumentParser,
    UserError,
    check_creatable,
    non_empty,
    non_negative_float,
    positive_int,
    run_main,
    seed_int,
    writable_dir,
)
from rcgdm.data import check_num_data, load_batch, open_source
from rcgdm.files import run_folder
from rcgdm.files.atomic import remove_leftovers, save_json, save_npy, save_torch
from rcgdm.files.locking import LOCK_FILE
from rcgdm.files.output_checks import refuse_outputs_inside_inputs
from rcgdm.files.provenance import package_versions, sha256_file
from rcgdm.rewards import Reward
from rcgdm.rewards.resnet18 import WEIGHT_CHOICES

REWARD_FILE = "reward_model.pth"
LABELS_FILE = "cifar10_outputs_with_noise.npy"
SIDECAR_FILE = "cifar10_outputs_with_noise.json"
OUTPUTS = (REWARD_FILE, LABELS_FILE, SIDECAR_FILE)
RUN = "fake_dataset"  # its record in --out_dir: .fake_dataset.files.json; its files are staged in .fake_dataset.staging


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=non_empty, default="cifar10",
                   help="cifar10, synthetic[:SEED] or an image folder (default: cifar10)")
    p.add_argument("--data_root", type=non_empty, default="./data", help="where cifar10 is downloaded (default: ./data)")
    p.add_argument("--num_data", type=positive_int, default=None, help="use the first N images (default: all)")
    p.add_argument("--reward", type=non_empty, default="resnet18-random",
                   help="resnet18-random (the paper), compressibility, aesthetic, or module:function (default: resnet18-random)")
    p.add_argument("--weights", default="imagenet", help="ResNet18 backbone: imagenet or none (random) (default: imagenet)")
    p.add_argument("--noise_std", type=non_negative_float, default=0.1, help="label noise std (default: 0.1)")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds the reward head and the label noise (default: 0)")
    p.add_argument("--out_dir", type=non_empty, default=".", help="output folder (default: .)")
    p.add_argument("--batch_size", type=positive_int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out_dir")
    return p.parse_args()


def compute_rewards(ground_truth: Reward, source, num_data: int, batch_size: int, state: PartialState) -> torch.Tensor:
    """Clean rewards of images 0..num_data-1 -> float32 (num_data, 1), in every process. Each process
    scores its share of the batches (rcgdm.distributed); the batches are those of a one-process run."""
    mine = distributed.my_share(distributed.batches(num_data, batch_size), state)
    scored = []
    with tqdm(total=sum(map(len, mine)), desc="rewarding images", unit="img", disable=not state.is_main_process) as bar:
        for indices in mine:
            scored.append((indices.start, ground_truth(load_batch(source, indices, rewards.SIZE)).cpu()))
            bar.update(len(indices))
    everything = sorted(gather_object(scored), key=lambda pair: pair[0])
    return torch.cat([chunk for _, chunk in everything])[:, None]


def main() -> None:
    args = parse_args()
    if args.weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {args.weights!r} is unknown; expected one of {', '.join(WEIGHT_CHOICES)}")
    if args.reward not in rewards.BUILT_IN and ":" not in args.reward:
        raise UserError(f"--reward {args.reward!r} is unknown; expected one of {', '.join(rewards.BUILT_IN)} or module:function")
    state, device = distributed.start(args.device)
    source = open_source(args.data, args.data_root)
    num_data = check_num_data(args.num_data, source)
    check_creatable(args.out_dir)
    refuse_outputs_inside_inputs({"--out_dir": args.out_dir}, {"--data": args.data if Path(args.data).is_dir() else None})
    out_dir, what = Path(args.out_dir), f"--out_dir {args.out_dir!r}"
    if state.is_main_process:  # only the main process ever locks: others probing would race with it
        run_folder.check_out_dir(out_dir, RUN, OUTPUTS, what, args.overwrite)
    with state.main_process_first():  # ImageNet weights are downloaded once; a failure here leaves nothing behind
        ground_truth = rewards.build_reward(args.reward, args.weights, args.seed).to(device)
    writable_dir(out_dir)

    with distributed.main_only_lock(state, out_dir / LOCK_FILE, what):
        if state.is_main_process:
            # again: another run may have written meanwhile
            run_folder.check_out_dir(out_dir, RUN, OUTPUTS, what, args.overwrite, holding_lock=True)
            remove_leftovers(out_dir)  # temporary files of killed runs
        write_labels(args, state, ground_truth, source, num_data, out_dir)


def write_labels(args: argparse.Namespace, state: PartialState, ground_truth: Reward, source, num_data: int, out_dir: Path):
    clean = compute_rewards(ground_truth, source, num_data, args.batch_size, state)
    if not state.is_main_process:
        return
    if args.reward == "resnet18-random" and args.weights == "none":
        print("WARNING: --weights none: the ResNet18 backbone is RANDOM, not ImageNet-trained (fine offline, not the paper)")
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed)) * args.noise_std
    labels = (clean + noise).numpy().astype(np.float32)

    staging = run_folder.make_staging(out_dir, RUN)
    try:  # the three files replace an earlier run's together, once all are written
        save_outputs(args, ground_truth, labels, source, staging)
        run_folder.publish(out_dir, RUN, OUTPUTS, run_folder.earlier_files(out_dir, RUN, OUTPUTS))
    finally:
        run_folder.remove_staging(staging)
    print(
        f"{num_data} labels from {source.identity}: mean {labels.mean():.4f}, std {labels.std():.4f} "
        f"(clean reward std {clean.std().item():.4f}, noise std {args.noise_std})"
    )
    print(f"wrote {out_dir / REWARD_FILE}, {out_dir / LABELS_FILE}, {out_dir / SIDECAR_FILE}")


def save_outputs(args: argparse.Namespace, ground_truth: Reward, labels: np.ndarray, source, out_dir: Path) -> None:
    """reward_model.pth, the labels and their sidecar JSON, into `out_dir`."""
    save_torch(ground_truth.checkpoint(), out_dir / REWARD_FILE)
    save_npy(labels, out_dir / LABELS_FILE)
    save_json(
        {
            "reward": args.reward,
            "data": source.identity,
            "num_data": len(labels),
            "noise_std": args.noise_std,
            "seed": args.seed,
            "weights": args.weights,
            "reward_model": REWARD_FILE,
            "reward_model_sha256": sha256_file(out_dir / REWARD_FILE),
            "labels_shape": list(labels.shape),
            "versions": package_versions(),
        },
        out_dir / SIDECAR_FILE,
    )


if __name__ == "__main__":
    run_main(main)
