"""Step 3 of the paper: reward-directed sampling from Stable Diffusion, scored and plotted.

At every denoising step, after classifier-free guidance, the noise prediction gets the term
    eps <- eps + sqrt(1 - alpha_bar_t) * guidance * grad_x 1/2 ||target - mu(x_t)||^2
(rcgdm/guidance.py). Each image is then scored by the ground-truth reward (fake_dataset.py) and by
the predictor on its VAE re-encoding (train.py).

    python3 inference.py --target 1 --guidance 100 --num_images 100
    python3 inference.py --target 2 4 6 8 10 --guidance 0 100 --prompt "a nice photo" "a dog"   # a sweep

--target, --guidance and --prompt take several values: the run covers every combination. Image i
always starts from the seed (--seed, i), whatever --bs, so columns of a sweep are comparable.
Writes per combination `{idx}_gt_{gt:.4f}_pred_{pred:.4f}.png`, and for the run results.csv,
summary.json, reward_vs_target.png, shift_vs_target.png (distribution shift: distance of the final
latents to the predictor's training latents) and grid.png.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import itertools
import secrets
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

from rcgdm import distributed, plots
from rcgdm.cli import (
    MAX_SEED,
    ArgumentParser,
    UserError,
    check_creatable,
    finite_float,
    non_empty,
    positive_int,
    run_main,
    writable_dir,
)
from rcgdm.evaluate import distribution_shift, score_images
from rcgdm.files.atomic import atomic_path, save_json, save_text
from rcgdm.files.checkpoint import load_checkpoint
from rcgdm.files.locking import LOCK_FILE, refuse_if_locked
from rcgdm.files.outputs import (
    STAGING,
    publish,
    refuse_existing,
    refuse_inputs_as_outputs,
    refuse_outputs_inside_inputs,
    uses_staging,
)
from rcgdm.files.provenance import package_versions, sha256_file
from rcgdm.guidance import GRAD_PATHS, PREDICTION_TYPES
from rcgdm.models import SD15, load_pipeline, local_model_folder, model_facts, model_fingerprint
from rcgdm.predictor import FORMAT as PREDICTOR_FORMAT
from rcgdm.predictor import predictor_from_checkpoint, reference_from_checkpoint
from rcgdm.resume import ANY_FILE as PROGRESS_FILES
from rcgdm.resume import FILE as PROGRESS_FILE
from rcgdm.resume import SweepProgress, check_start, unique_rows
from rcgdm.rewards import load_reward
from rcgdm.sampler import RewardGuidance, decode, sample_latents
from rcgdm.schedulers import SCHEDULERS, check_steps, make_scheduler, scheduler_support
from rcgdm.seeds import image_generators, image_seed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_GLOB = "*_gt_*_pred_*.png"
COLUMNS = ("prompt", "target", "guidance", "best_of", "image", "seed", "image_seed", "gt", "pred", "shift", "unet_calls", "file")


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=finite_float, nargs="+", default=[0.0], help="target reward(s) (default: 0)")
    p.add_argument("--guidance", type=finite_float, nargs="+", default=[0.0], help="guidance strength(s) (default: 0)")
    p.add_argument("--prompt", nargs="+", default=["a nice photo"],
                   help='prompt(s); "" samples unconditionally (default: "a nice photo")')
    p.add_argument("--out_dir", type=non_empty, default=None,
                   help="default: imgs/target{target}guidance{guidance}, or imgs/sweep for a sweep")
    p.add_argument("--num_images", type=positive_int, default=4, help="images per combination (default: 4)")
    p.add_argument("--bs", type=positive_int, default=4, help="images per batch (default: 4)")
    p.add_argument("--seed", type=int, default=-1, help=f"-1: a random seed, recorded; 0 to {MAX_SEED}: fixed (default: -1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--model", type=non_empty, default=SD15, help=f"hub id, local diffusers folder, or tiny (default: {SD15})")
    p.add_argument("--reward_model", type=non_empty, default="reward_model.pth", help="ground-truth reward from fake_dataset.py")
    p.add_argument("--predictor", type=non_empty, default="convnet.pth", help="reward predictor from train.py")
    p.add_argument("--reward", type=non_empty, default=None,
                   help="module:function: run the user-code reward that --reward_model records (files never run code)")
    p.add_argument("--num_inference_steps", type=positive_int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--cfg", type=finite_float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--scheduler", default="pndm", help=f"{', '.join(SCHEDULERS)} or their diffusers class names (default: pndm)")
    p.add_argument("--height", type=positive_int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=positive_int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch_mean_guidance", action="store_true", help="divide the term by the batch size, as the original code")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's images and files in --out_dir")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out_dir (same settings)")
    p.add_argument("--ignore_provenance", action="store_true",
                   help="use a predictor recorded as trained for another reward model or model (otherwise refused)")
    p.add_argument("--grad_path", default="xt", choices=GRAD_PATHS,
                   help="xt: the predictor on the noisy latent (the paper); x0: on the denoised estimate (default: xt)")
    p.add_argument("--best_of", type=positive_int, nargs="+", default=[1],
                   help="N candidates per image, keep the one whose predicted reward is closest to the target (default: 1)")
    return p.parse_args()


@dataclass(frozen=True)
class Combo:
    """One (prompt, target, guidance, best-of-N) of a run and the folder its images go to."""

    prompt_index: int
    prompt: str
    target: float
    guidance: float
    best_of: int
    folder: Path

    def key(self) -> tuple:
        return (self.prompt, self.target, self.guidance, self.best_of)


def plan(args: argparse.Namespace) -> tuple[Path, list[Combo]]:
    """The run folder and its combinations; a single combination keeps the original's layout."""
    single = len(args.prompt) == len(args.target) == len(args.guidance) == len(args.best_of) == 1
    out_dir = Path(args.out_dir or (f"imgs/target{args.target[0]}guidance{args.guidance[0]}" if single else "imgs/sweep"))
    combos = []
    grid = itertools.product(enumerate(args.prompt), args.target, args.guidance, args.best_of)
    for (k, prompt), target, guidance, best_of in grid:
        prefix = f"prompt{k}_" if len(args.prompt) > 1 else ""
        suffix = f"_best{best_of}" if args.best_of != [1] else ""
        folder = out_dir if single else out_dir / f"{prefix}target{target}guidance{guidance}{suffix}"
        combos.append(Combo(k, prompt, target, guidance, best_of, folder))
    return out_dir, combos


MAX_TARGET = 1e6  # rewards are O(1)-O(100); beyond this a target is a typo, and figures cannot draw it
MAX_SIZE = 4096
MAX_STEPS = 1000  # SD's training timesteps: no scheduler can take more steps than that


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before anything loads."""
    for prompt in args.prompt:
        if prompt and not prompt.strip():
            raise UserError(f"--prompt {prompt!r} is blank; expected some text, or '' for unconditional samples")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value % 8 or value > MAX_SIZE):
            example = min(value - value % 8 or 8, MAX_SIZE)
            raise UserError(f"--{flag} {value} is not a multiple of 8 up to {MAX_SIZE}; expected e.g. {example}")
    if not -1 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed} is out of range; expected -1 (random) or a seed from 0 to {MAX_SEED}")
    for target in args.target:
        if abs(target) > MAX_TARGET:
            raise UserError(f"--target {target:g} is out of range; expected a number from {-MAX_TARGET:g} to {MAX_TARGET:g}")
    if args.num_inference_steps > MAX_STEPS:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} is more than the {MAX_STEPS} training timesteps; "
                        f"expected 1 to {MAX_STEPS}")  # fmt: skip
    for flag, normalise in (("prompt", lambda p: " ".join(p.split())), ("target", float), ("guidance", float), ("best_of", int)):
        values = [normalise(v) for v in getattr(args, flag)]
        repeated = next((v for k, v in enumerate(values) if v in values[:k]), None)
        if repeated is not None:
            raise UserError(f"--{flag} has {repeated!r} twice; expected distinct values (a sweep samples each once)")


RUN_FILES = ("results.csv", "summary.json", "reward_vs_target.png", "shift_vs_target.png", "reward_vs_compute.png", "grid.png")


def check_outputs(args: argparse.Namespace, out_dir: Path, combos: list[Combo]) -> None:
    """Before anything is created: every folder can be made, no input is an output, and an earlier run's
    files are not replaced unless --overwrite (or --resume, for an interrupted run)."""
    for combo in combos:
        check_creatable(combo.folder)
    outputs = [out_dir / name for name in (*RUN_FILES, PROGRESS_FILE)]
    inputs = {"--reward_model": args.reward_model, "--predictor": args.predictor}
    refuse_inputs_as_outputs(inputs, outputs)
    folders = {combo.folder.resolve() for combo in combos}
    for flag, path in inputs.items():
        if Path(path).resolve().parent in folders and fnmatch.fnmatch(Path(path).name, IMAGE_GLOB):
            raise UserError(f"{flag} {path!r} is named like this run's images, in its folder; inputs are never outputs, "
                            "expected another path")  # fmt: skip
    refuse_outputs_inside_inputs({"--out_dir": out_dir}, {"--model": local_model_folder(args.model)})
    check_start(out_dir, args.resume, args.overwrite)
    if args.overwrite or args.resume:
        return
    refuse_existing(outputs[: len(RUN_FILES)], "use --overwrite to replace it, or another --out_dir")
    for combo in combos:
        refuse_images(combo.folder, sorted(combo.folder.glob(IMAGE_GLOB)) if combo.folder.is_dir() else [])


def refuse_images(folder: Path, images: list[Path]) -> None:
    if images:
        raise UserError(f"--out_dir {str(folder)!r} already holds {len(images)} images; use --overwrite or another --out_dir")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise UserError(f"--dtype fp16 on {device.type} is not supported; expected fp32 or bf16 there")
    return DTYPES[name]


def prepare_folders(out_dir: Path, combos: list[Combo], overwrite: bool, progress: SweepProgress) -> None:
    """Create every folder. Images already there are refused, or cleared with --overwrite; when
    resuming, only the images of batches that did not finish are cleared (they are redone).
    A fresh start also removes an interrupted run's progress files."""
    if not progress.rows:
        progress.remove_files()
    for combo in combos:
        writable_dir(combo.folder)
        existing = sorted(combo.folder.glob(IMAGE_GLOB))
        if progress.rows:
            kept = {out_dir / r["file"] for r in progress.rows}
            existing = [p for p in existing if p not in kept]
        elif not overwrite:
            refuse_images(combo.folder, existing)
        for path in existing:
            path.unlink()


def image_settings(args: argparse.Namespace, seed: int) -> dict:
    """Everything that shapes the images: a resumed run must match it."""
    keys = ("prompt", "target", "guidance", "num_images", "bs", "seed", "model", "reward_model", "predictor",
            "num_inference_steps", "cfg", "scheduler", "height", "width", "dtype", "batch_mean_guidance", "grad_path",
            "best_of")  # fmt: skip
    contents = {  # what the files hold, not only their paths: a retrained predictor at the same path is another run
        "reward_model_sha256": sha256_file(args.reward_model),
        "predictor_sha256": sha256_file(args.predictor),
        "model_fingerprint": model_fingerprint(args.model),
    }
    return {**{key: getattr(args, key) for key in keys}, **contents, "seed_used": seed}


def load_png(path: Path) -> torch.Tensor:
    """A saved image -> float32 (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def summarise(combos: list[Combo], rows: list[dict], seconds: dict) -> list[dict]:
    """Per combination: rewards (mean, std, distance to target), distribution shift, compute and time."""
    out = []
    for combo in combos:
        mine = [r for r in rows if row_key(r) == combo.key()]
        gt, pred = torch.tensor([r["gt"] for r in mine]), torch.tensor([r["pred"] for r in mine])
        shifts = [r.get("shift") for r in mine]
        shift = None if None in shifts else torch.tensor(shifts)
        out.append(
            {
                "prompt": combo.prompt,
                "target": combo.target,
                "guidance": combo.guidance,
                "best_of": combo.best_of,
                "n": len(mine),
                "unet_calls": sum(r["unet_calls"] for r in mine) / len(mine),
                "gt_distance": (gt - combo.target).abs().mean().item(),
                "gt_mean": gt.mean().item(),
                "gt_std": gt.std(correction=0).item(),
                "pred_mean": pred.mean().item(),
                "pred_std": pred.std(correction=0).item(),
                "shift_mean": None if shift is None else shift.mean().item(),
                "shift_std": None if shift is None else shift.std(correction=0).item(),
                "folder": str(combo.folder),
                "sampling_seconds": seconds.get(combo),
            }
        )
    for c in out:  # shift relative to the unguided images of the same prompt, when the run has them
        unguided = [u["shift_mean"] for u in out if u["prompt"] == c["prompt"] and u["guidance"] == 0 and u["best_of"] == 1]
        known = c["shift_mean"] is not None and unguided and None not in unguided
        c["shift_vs_unguided"] = c["shift_mean"] / (sum(unguided) / len(unguided)) if known else None
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)  # rows read back from progress.json have their keys sorted
    writer.writeheader()
    writer.writerows(rows)
    save_text(buffer.getvalue(), path)


def main() -> None:
    args = parse_args()
    check_args(args)
    start = time.perf_counter()
    state, device = distributed.start(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir, combos = plan(args)
    scheduler_support(args.scheduler)  # an unknown or unsupported scheduler fails before anything loads
    if state.is_main_process:  # only the main process ever locks: other processes probing too would race with it
        refuse_if_locked(out_dir / LOCK_FILE, f"--out_dir {str(out_dir)!r}")  # a running sweep's files are not an earlier run's
    check_outputs(args, out_dir, combos)
    models = load_models(args, state, device, dtype)  # every input is checked before any output folder exists
    writable_dir(out_dir)
    with distributed.main_only_lock(state, out_dir / LOCK_FILE, f"--out_dir {str(out_dir)!r}"):
        progress = open_progress(args, state, out_dir, combos)
        run_dir = progress.path.parent  # out_dir, or the staging folder of a run that replaces an earlier one
        staged = [replace(combo, folder=run_dir / combo.folder.relative_to(out_dir)) for combo in combos]
        with state.main_process_first():  # folders are readied before anyone writes
            if state.is_main_process:
                prepare_folders(run_dir, staged, args.overwrite, progress)
        rows = run_sweep(args, state, models, run_dir, staged, progress, start)
        if state.is_main_process and run_dir != out_dir:
            publish(run_dir, out_dir, [*RUN_FILES, *earlier_files(out_dir, combos), *(row["file"] for row in rows)])
        state.print(f"wrote {len(rows)} images and {out_dir / 'results.csv'}, summary.json, the figures and grid.png")


@dataclass(frozen=True)
class Models:
    """What a run samples and scores with, loaded and checked."""

    pipe: object
    reward: object
    reward_meta: dict
    predictor: torch.nn.Module
    predictor_meta: dict
    reference: torch.Tensor | None  # the predictor's training latents, for the distribution shift


def load_models(args: argparse.Namespace, state: PartialState, device: torch.device, dtype: torch.dtype) -> Models:
    """The pipeline (with --scheduler), the ground-truth reward and the predictor, on `device`. What can be
    checked from configs and checkpoints is checked before the pipeline's weights load."""
    with state.main_process_first():  # hub downloads happen once
        facts = model_facts(args.model)
        check_guidable(args, facts)
        checkpoint = load_checkpoint(args.predictor, PREDICTOR_FORMAT)  # read once: the net and its training latents
        predictor, predictor_meta = predictor_from_checkpoint(checkpoint, args.predictor, latent_channels=facts["in_channels"])
        reference = reference_from_checkpoint(checkpoint, args.predictor)
        check_grad_path(args.grad_path, args.predictor, predictor_meta)
        check_latent_size(args, facts, predictor_meta)
        reward, reward_meta = load_reward(args.reward_model, args.reward)
        if not args.ignore_provenance:
            check_provenance(args, predictor_meta)
        pipe = load_pipeline(args.model, dtype).to(device)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    train_steps = pipe.scheduler.config.num_train_timesteps
    if args.num_inference_steps > train_steps:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} is more than --model {args.model!r}'s {train_steps} "
                        f"training timesteps; expected 1 to {train_steps}")  # fmt: skip
    return Models(pipe, reward.to(device), reward_meta, predictor.to(device), predictor_meta, reference)


def open_progress(args: argparse.Namespace, state: PartialState, out_dir: Path, combos: list[Combo]) -> SweepProgress:
    """The main process starts (or resumes) the run; every process gets its settings (the seed), the rows already
    done and the folder the run writes to (`run_folder`)."""
    shared = [None]
    if state.is_main_process:
        seed = args.seed if args.seed >= 0 else secrets.randbelow(2**31)
        run_dir = run_folder(args, out_dir, combos)
        progress = SweepProgress.open(run_dir, image_settings(args, seed), args.resume, args.overwrite)
        if progress.rows:
            print(f"--resume: {len(progress.rows)} images already done in {out_dir}")
        elif args.seed < 0:
            print(f"--seed -1: using the random seed {progress.seed} (recorded in summary.json)")
        shared = [(progress.settings, progress.rows, str(run_dir))]
    settings, rows, run_dir = broadcast_object_list(shared)[0]
    return SweepProgress(Path(run_dir), settings, rows, state.process_index)


def run_folder(args: argparse.Namespace, out_dir: Path, combos: list[Combo]) -> Path:
    """Where the run writes: out_dir; or, when it replaces an earlier run's outputs (--overwrite), a staging folder
    in it whose files replace the earlier ones only once the run completes, so a run that fails leaves them as
    they were; --resume continues in the staging folder of an interrupted overwrite."""
    staging = out_dir / STAGING
    replacing = args.overwrite and not args.resume and bool(earlier_files(out_dir, combos))
    return staging if uses_staging(staging, args.resume, any(staging.glob(PROGRESS_FILES)), replacing) else out_dir


def earlier_files(out_dir: Path, combos: list[Combo]) -> list[str]:
    """What an earlier run left where this one writes (run files, progress files, images), relative to out_dir."""
    found = [path for name in RUN_FILES if (path := out_dir / name).exists()] + sorted(out_dir.glob(PROGRESS_FILES))
    found += [path for combo in combos if combo.folder.is_dir() for path in sorted(combo.folder.glob(IMAGE_GLOB))]
    return [path.relative_to(out_dir).as_posix() for path in found]


def run_sweep(args, state: PartialState, models: Models, out_dir: Path, combos: list[Combo], progress: SweepProgress,
              start: float) -> list[dict]:  # fmt: skip
    """Sample this process's share of the batches; the main process then gathers every row and writes the run's files
    (into `out_dir`: the run folder, or its staging folder) -> every row of the run."""
    seed = progress.seed
    pipe, reward_model, predictor = models.pipe, models.reward, models.predictor
    batches = [(combo, indices) for combo in combos for indices in distributed.batches(args.num_images, args.bs)]
    mine = distributed.my_share(batches, state)
    todo = [(combo, indices) for combo, indices in mine if not progress.finished(combo.key(), indices[0])]
    seconds = dict.fromkeys(range(len(combos)), 0.0)
    desc = "images" if state.num_processes == 1 else f"images (process 0 of {state.num_processes})"
    total, left = (sum(len(indices) for _, indices in units) for units in (mine, todo))
    with tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not state.is_main_process) as bar:
        for combo, indices in todo:
            batch_start = time.perf_counter()
            guidance = RewardGuidance(predictor, combo.target, combo.guidance, args.batch_mean_guidance, args.grad_path)
            sampled = sample_best_of(args, models, combo, guidance, seed, indices)
            rows = save_images(combo, indices, seed, out_dir, *sampled)
            progress.add(rows)
            seconds[combos.index(combo)] += time.perf_counter() - batch_start
            bar.update(len(indices))

    all_rows = unique_rows(gather_object(progress.rows))
    all_seconds = gather_object([seconds])
    if state.is_main_process:
        check_images_visible(out_dir, all_rows)
        final = plan(args)[1]  # the combinations as the summary names them (their folders, not the staging ones)
        sampling_seconds = {combo: sum(s[k] for s in all_seconds) for k, combo in enumerate(final)}
        provenance = {"reward_model": models.reward_meta, "predictor": models.predictor_meta, "processes": state.num_processes}
        write_outputs(args, pipe, seed, out_dir, final, all_rows, sampling_seconds, (reward_model, predictor), provenance, start)
        progress.remove_files()
    return all_rows


def save_images(combo: Combo, indices: range, seed: int, out_dir: Path, images: torch.Tensor, gt: torch.Tensor,
                pred: torch.Tensor, shift: torch.Tensor | None, unet_calls: int) -> list[dict]:  # fmt: skip
    """Write a batch's images as {idx}_gt_{gt}_pred_{pred}.png -> their results.csv rows."""
    rows = []
    for j, i in enumerate(indices):
        path = combo.folder / f"{i}_gt_{gt[j]:.4f}_pred_{pred[j]:.4f}.png"
        save_png(images[j], path)
        row = {"prompt": combo.prompt, "target": combo.target, "guidance": combo.guidance, "best_of": combo.best_of, "image": i,
               "seed": seed, "image_seed": image_seed(seed, i), "gt": gt[j].item(), "pred": pred[j].item(),
               "shift": None if shift is None else shift[j].item(), "unet_calls": unet_calls,
               "file": path.relative_to(out_dir).as_posix()}  # fmt: skip
        rows.append(row)
    return rows


def write_outputs(args, pipe, seed: int, out_dir: Path, combos: list[Combo], rows: list[dict], seconds: dict, models: tuple,
                  provenance: dict, start: float) -> None:  # fmt: skip
    """results.csv, the figures, grid.png and summary.json for every row of the run; prints the summary."""
    order = {combo.key(): n for n, combo in enumerate(combos)}
    rows = sorted(rows, key=lambda r: (order[row_key(r)], r["image"]))
    summary = summarise(combos, rows, seconds)
    write_csv(rows, out_dir / "results.csv")
    plots.reward_vs_target(summary, out_dir / "reward_vs_target.png")
    plots.shift_vs_target(summary, out_dir / "shift_vs_target.png")
    plots.reward_vs_compute(summary, out_dir / "reward_vs_compute.png")
    write_grid(args, pipe, seed, out_dir, rows, *models, out_dir / "grid.png")
    save_json(
        {
            "settings": {**vars(args), "seed_used": seed, "out_dir": str(plan(args)[0])},
            "combinations": summary,
            **provenance,
            "seconds": time.perf_counter() - start,
            "versions": package_versions(),
        },
        out_dir / "summary.json",
    )
    for c in summary:
        print(
            f"target {c['target']:g}, guidance {c['guidance']:g}" + (f", best of {c['best_of']}" if c["best_of"] > 1 else "")
            + f", {c['prompt']!r}: "
            f"ground truth {c['gt_mean']:.4f} ± {c['gt_std']:.4f}, predicted {c['pred_mean']:.4f} ± {c['pred_std']:.4f}"
        )


def check_images_visible(out_dir: Path, rows: list[dict]) -> None:
    """The main process reads the images back for grid.png: every process must have written them where it can see them."""
    missing = [row["file"] for row in rows if not (out_dir / row["file"]).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} images (first {missing[0]!r}) are not in --out_dir {str(out_dir)!r} as the main process sees it; "
            "with several machines, --out_dir must be on a filesystem they share"
        )


def check_guidable(args: argparse.Namespace, facts: dict) -> None:
    """Refuse, from configs alone, a model the paper's term cannot be applied to correctly."""
    kind = facts["prediction_type"]
    if kind not in PREDICTION_TYPES:
        raise UserError(f"--model {args.model!r} predicts {kind!r}; expected one of {', '.join(PREDICTION_TYPES)} "
                        "(see README, model families)")  # fmt: skip
    check_steps(args.scheduler, kind)


def check_latent_size(args: argparse.Namespace, facts: dict, meta: dict) -> None:
    """The predictor must have been trained on latents of the size sampled: its average pool accepts any size, but
    its features were learned at one scale, so at another its gradient would steer with no guarantee (README)."""
    trained, scale, default = meta.get("latent_size"), facts["vae_scale_factor"], facts["sample_size"]
    if trained is None or not isinstance(default, int):
        return
    sampled = [(args.height or default * scale) // scale, (args.width or default * scale) // scale]
    if list(trained) != sampled:
        h, w = (n * scale for n in trained)
        raise UserError(f"--predictor {args.predictor!r} was trained on {trained[0]}x{trained[1]} latents ({h}x{w} images); "
                        f"this run samples {sampled[0]}x{sampled[1]}; expected --height {h} --width {w}, or a predictor "
                        f"trained at that size (train.py image_size)")  # fmt: skip


def check_provenance(args: argparse.Namespace, meta: dict) -> None:
    """The predictor must come from this reward model's labels and this model's VAE (as train.py recorded)."""
    recorded = meta.get("reward_model_sha256")
    if recorded is not None and recorded != sha256_file(args.reward_model):
        raise UserError(f"--predictor {args.predictor!r} was trained on labels of another reward model than --reward_model "
                        f"{args.reward_model!r}; expected the pair written together (or --ignore_provenance)")  # fmt: skip
    trained_on = meta.get("model")
    if trained_on is not None and trained_on != args.model:
        raise UserError(f"--predictor {args.predictor!r} was trained on --model {trained_on!r}'s latents, not {args.model!r}; "
                        "expected the same model (or --ignore_provenance)")  # fmt: skip


def check_grad_path(grad_path: str, path: str, meta: dict) -> None:
    """A predictor trained on noisy latents serves --grad_path xt; one trained on clean latents (noise=False), x0."""
    noised = meta.get("noised", True)
    if noised != (grad_path == "xt"):
        trained = "noisy latents (train.py noise=True)" if noised else "clean latents (train.py noise=False)"
        serves = "xt" if noised else "x0"
        raise UserError(f"--predictor {path!r} was trained on {trained}; it serves --grad_path {serves}, not {grad_path}")


def row_key(row: dict) -> tuple:
    return (row["prompt"], row["target"], row["guidance"], row["best_of"])


def sample_best_of(args, models: Models, combo: Combo, guidance, seed: int, indices: range):
    """Sample images `indices` of a combination; with best-of-N, draw N candidates of each (candidate 0
    is the plain image) and keep the one whose predicted reward is closest to the target.
    -> (images (B, 3, H, W), ground-truth rewards (B,), predicted rewards (B,), distribution shift (B,) or None,
    UNet calls per image)."""
    pipe, best = models.pipe, None
    for candidate in range(combo.best_of):
        generators = image_generators(seed, indices, candidate)
        size = (args.height, args.width)
        latents = sample_latents(pipe, combo.prompt, generators, guidance, args.num_inference_steps, args.cfg, *size)
        check_finite(latents, "the final latents", combo, args.cfg)
        images = decode(pipe, latents, generators)
        gt, pred = score_images(images, models.reward, models.predictor, pipe.vae)
        check_finite(gt, "the ground-truth rewards", combo, args.cfg)
        check_finite(pred, "the predicted rewards", combo, args.cfg)
        shift = distribution_shift(latents, models.reference)  # None for every candidate alike, or a tensor for each
        if best is not None:
            closer = (pred - combo.target).abs() < (best[2] - combo.target).abs()
            images = torch.where(closer.view(-1, 1, 1, 1), images, best[0])
            gt, pred = torch.where(closer, gt, best[1]), torch.where(closer, pred, best[2])
            shift = None if shift is None else torch.where(closer, shift, best[3])
        best = (images, gt, pred, shift)
    unet_calls = combo.best_of * len(pipe.scheduler.timesteps)  # one batched call per step covers both CFG branches
    return (*best, unet_calls)


def check_finite(values: torch.Tensor, what: str, combo: Combo, cfg: float) -> None:
    """NaN or inf is never a result: stop with the likely cause."""
    if not torch.isfinite(values).all():
        raise UserError(f"{what} became NaN or inf at target {combo.target:g}, guidance {combo.guidance:g}, --cfg {cfg:g}; "
                        "likely cause: a guidance or cfg too large for this model, or a damaged model; "
                        "expected smaller values")  # fmt: skip


def write_grid(args, pipe, seed: int, out_dir: Path, rows: list[dict], reward_model, predictor, path: Path) -> None:
    """The paper's Figure 6 layout: rows = prompts, an unguided column, then one column per target
    at the run's strongest guidance (and first --best_of); every cell is image 0 (as saved), so every
    cell starts from the same noise."""
    strongest = max(args.guidance, key=abs)
    targets = sorted(set(args.target))
    shown = [r for r in rows if r["image"] == 0 and r["best_of"] == args.best_of[0]]
    first_images = {(r["prompt"], r["target"], r["guidance"]): r for r in shown}

    def cell(row: dict) -> tuple[torch.Tensor, float, float]:
        return load_png(out_dir / row["file"]), row["gt"], row["pred"]

    grid, captions = [], []
    for prompt in args.prompt:
        unguided = next((cell(r) for (p, _, g), r in first_images.items() if p == prompt and g == 0), None)
        if unguided is None:  # the sweep has no guidance 0: sample the unguided cell alone
            generators = image_generators(seed, [0])
            latents = sample_latents(pipe, prompt, generators, None, args.num_inference_steps, args.cfg, args.height, args.width)
            image = decode(pipe, latents, generators)
            gt, pred = score_images(image, reward_model, predictor, pipe.vae)
            unguided = (image[0], gt.item(), pred.item())
        cells = [unguided] + [cell(first_images[(prompt, t, strongest)]) for t in targets]
        grid.append([image for image, _, _ in cells])
        captions.append([f"gt {gt:.3f} / pred {pred:.3f}" for _, gt, pred in cells])
    column_labels = ["unguided"] + [f"target {t:g}" for t in targets]
    row_labels = [textwrap.fill(prompt, 24) or "(unconditional)" for prompt in args.prompt]
    plots.image_grid(row_labels, column_labels, grid, captions, path)
    print(f"grid.png: guidance {strongest:g}, image 0 of each combination")


if __name__ == "__main__":
    run_main(main)
