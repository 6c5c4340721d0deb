"""Step 2 of the paper: train the reward predictor mu(x) on noisy, frozen SD VAE latents.

Each image is resized to `image_size`, scaled to [-1, 1] and encoded once by the VAE (one
latent_dist sample times the scaling factor; cached in `cache_dir`). Every training step noises
each latent with `scheduler.add_noise` at a timestep drawn uniformly from the `num_inference_steps`
schedule, with fresh noise, and a 3-layer residual ConvNet learns to predict the image's reward
label from the noisy latent (it is not told t). MSE loss, Adam. For SDXL the same, on SDXL's VAE; for
SD3 the VAE's shift and scaling factors apply and the noise is flow matching's, (1 - sigma) x0 + sigma eps
at the sigmas of the model's `num_inference_steps` schedule (rcgdm/families.py, rcgdm/training.py).

Edit the constants below, or override any of them:

    python3 train.py --num_epochs=5 --lr=3e-4
    python3 train.py --model=tiny --data=synthetic --num_data=256 --num_epochs=3   # offline

Writes `out_path` (the predictor: state_dict + metadata) and beside it, named from its stem
(convnet.pth -> convnet.*): `.resume.pth` (each epoch; `--resume=True` continues from it),
`.best.pth` (best validation loss), `.metrics.jsonl`, `.loss_curve.png`, `.loss_by_noise.png`
(validation loss per timestep bucket) and `.train_summary.json`. A run never replaces another
run's files: `--overwrite=True` says it may.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState

from rcgdm import distributed, plots
from rcgdm.cli import MAX_SEED, UserError, check_creatable, run_main, writable_dir
from rcgdm.config import describe, parse_overrides
from rcgdm.data import check_num_data, open_source
from rcgdm.files import run_folder
from rcgdm.files.atomic import remove_leftovers, save_json, save_text, save_torch
from rcgdm.files.locking import refuse_if_locked
from rcgdm.files.outputs import STAGING, refuse_inputs_as_outputs, refuse_nested_runs, refuse_outputs_inside_inputs
from rcgdm.files.provenance import package_versions, sha256_file
from rcgdm.latents import LatentSpec, cached_latents, vae_fingerprint
from rcgdm.models import check_vae, load_scheduler, load_vae, local_model_folder, model_facts
from rcgdm.predictor import ThreeLayerConvNet, predictor_checkpoint, reference_sample
from rcgdm.schedulers import check_step_count
from rcgdm.training import (
    add_training_noise,
    check_labels_source,
    labels_sidecar,
    load_labels,
    load_state,
    loss_by_noise_level,
    mean_squared_error,
    read_state,
    save_state,
    split,
    train_epoch,
)

# ----------------------------------------------------------------------------- config
lr = 0.001
num_data = 50000
num_epochs = 100
batch_size = 10
model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local diffusers folder (SD 1.x/2.x, SDXL, SD3), or "tiny"
data = "cifar10"  # cifar10, synthetic[:SEED], or an image folder
data_root = "./data"
labels_path = "cifar10_outputs_with_noise.npy"
out_path = "convnet.pth"
image_size = 512
num_inference_steps = 50  # the timesteps training noise is drawn from
val_fraction = 0.02  # held-out share for validation; 0 = train on everything, as the original
seed = 0  # model init, split, noise, latent samples
device = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
cache_dir = "./cache"  # latent cache
encode_batch_size = 32
noise = True  # train on noisy latents x_t (the paper); False: clean latents, for inference.py --grad_path x0
resume = False  # continue from <out_path stem>.resume.pth
overwrite = False  # replace an earlier run's files at out_path (otherwise refused)
check_provenance = True  # refuse labels whose sidecar (.json beside them) names other data than `data`
wandb = False  # log to Weights & Biases (needs `pip install wandb`)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if k.islower() and k[0] != "_" and isinstance(v, (bool, int, float, str))]
# a resumed run must agree with its checkpoint on everything but num_epochs, device, paths and logging
RESUME_MUST_MATCH = ("lr", "num_data", "batch_size", "model", "data", "image_size", "num_inference_steps", "val_fraction", "seed",
                     "noise", "labels_sha256", "vae_fingerprint")  # the last two: what the files hold

CHECKS = {
    "lr": (lambda v: v > 0, "a number > 0"),
    "num_data": (lambda v: v >= 1, "an integer >= 1"),
    "num_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "image_size": (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, >= 8"),
    "num_inference_steps": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"a seed from 0 to {MAX_SEED}"),
    "encode_batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


PATHS = ("model", "data", "data_root", "labels_path", "out_path", "cache_dir")


def read_config(argv: list[str]) -> SimpleNamespace:
    defaults = {k: globals()[k] for k in config_keys}
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__ + "\nconfig (defaults):\n" + describe(defaults))
        sys.exit(0)
    config = {**defaults, **parse_overrides(defaults, argv)}
    for key, (ok, expected) in CHECKS.items():
        if not ok(config[key]):
            raise UserError(f"{key}={config[key]!r} is out of range; expected {expected}")
    for key in PATHS:  # an empty path would silently mean the working folder
        if not config[key].strip():
            raise UserError(f"{key}={config[key]!r} is empty; expected a path or name")
    return SimpleNamespace(**config)


def encode_dataset(config: SimpleNamespace, state: PartialState, dev: torch.device) -> tuple[torch.Tensor, int, float, str]:
    """(latents (N, C, h, w) float32 on the CPU, images encoded now, seconds from the VAE's load to the latents,
    the VAE's fingerprint)."""
    with state.main_process_first():  # CIFAR-10 and the VAE are downloaded once
        source = open_source(config.data, config.data_root)
        check_num_data(config.num_data, source)
        check_labels_source(config.labels_path, source.identity, config.data, config.check_provenance, state.is_main_process)
        vae = load_vae(config.model, torch.float16 if dev.type == "cuda" else torch.float32)
    start = time.perf_counter()
    spec = LatentSpec(vae_fingerprint(vae), source.identity, config.num_data, config.image_size, config.seed)
    latents, encoded = cached_latents(vae.to(dev), source, spec, config.cache_dir, config.encode_batch_size, dev, state)
    return latents, encoded, time.perf_counter() - start, spec.vae


def start_wandb(config: SimpleNamespace):
    if not config.wandb:
        return None
    try:
        import wandb as wandb_module
    except ImportError:
        raise UserError("wandb=True but wandb is not installed; pip install wandb, or use wandb=False") from None
    return wandb_module.init(project="rcgdm", config=vars(config))


def main() -> None:
    config = read_config(sys.argv[1:])
    start_time = time.perf_counter()
    state, dev = distributed.start(config.device)
    if config.batch_size < state.num_processes:
        n = state.num_processes
        raise UserError(f"batch_size={config.batch_size} is smaller than the {n} processes; "
                        f"expected at least {n}, one sample each")
    out_path = Path(config.out_path)
    files, staged = run_files(out_path), run_files(staging_folder(out_path) / out_path.name)
    lock, what = lock_file(out_path), f"out_path {str(out_path)!r}"
    if state.is_main_process:  # a running run's files are not an earlier run's (only the main process ever locks)
        refuse_if_locked(lock, what)
        refuse_nested_runs(out_path.parent, "out_path's folder", below=False)
        run_folder.recover(out_path.parent, run_name(out_path), lock, what)  # a publish cut short by a kill is finished
    check_outputs(config, files, staged)
    labels = load_labels(config.labels_path, config.num_data)
    train_idx, val_idx = split(config.num_data, config.val_fraction, config.seed)  # an empty side fails here, before any encoding
    facts = model_facts(config.model)  # configs only: a model that cannot be had fails before anything is created
    check_vae(config.model)
    check_step_count(load_scheduler(config.model), config.num_inference_steps)  # a config only: its schedule must exist
    if config.data != "cifar10":  # cheap to open (cifar10 is downloaded once, later, by the main process first)
        check_num_data(config.num_data, open_source(config.data, config.data_root))
    writable_dir(out_path.parent, "out_path's folder")
    writable_dir(config.cache_dir, "cache_dir")
    with distributed.main_only_lock(state, lock, what):
        if state.is_main_process:  # again, holding the lock: another run may have written meanwhile
            check_outputs(config, files, staged)
            remove_leftovers(out_path.parent)  # temporary files of killed runs
        writes = where_to_write(config, files, staged, state.is_main_process)
        if config.resume:  # checked in full before any encoding
            check_resume_state(writes["resume"], facts["in_channels"], config)
        train(config, facts["family"], state, dev, labels, (train_idx, val_idx), writes, start_time)
        if state.is_main_process:
            finish(out_path, files, writes)
    distributed.finish(state)


def check_resume_state(path: Path, channels: int, config: SimpleNamespace) -> None:
    """UserError unless the saved state at `path` is whole and has epochs left to train."""
    net = ThreeLayerConvNet(in_channels=channels)
    epoch = len(read_state(path, net, torch.optim.Adam(net.parameters(), lr=config.lr), torch.Generator())["history"])
    if epoch >= config.num_epochs:
        raise UserError(f"resume=True: {str(path)!r} already finished epoch {epoch} of num_epochs={config.num_epochs}; "
                        "expected a larger num_epochs to train further")


def where_to_write(config: SimpleNamespace, files: dict[str, Path], staged: dict[str, Path], main: bool) -> dict[str, Path]:
    """`files` (beside out_path); or `staged`, in a staging folder, when the run replaces an earlier one (its files
    are published over the earlier ones once it completes: rcgdm/files/run_folder.py) or resumes an interrupted
    replacement. A fresh start removes an unfinished replacement's staging folder (the main process does)."""
    staging = staged["predictor"].parent
    if config.resume:
        return staged if run_folder.is_staging(staging) and staged["resume"].is_file() else files
    replacing = config.overwrite and bool(earlier_files(files))
    if main:
        run_folder.make_staging(staging) if replacing else run_folder.remove_staging(staging)
    return staged if replacing else files


def finish(out_path: Path, files: dict[str, Path], writes: dict[str, Path]) -> None:
    """The run completed: publish its files over the earlier run's (staged), or record them (in place)."""
    written = [path.name for path in writes.values() if path.is_file()]
    if writes["predictor"] != files["predictor"]:
        run_folder.publish(writes["predictor"].parent, out_path.parent, run_name(out_path), written, earlier_files(files))
    else:
        run_folder.record(out_path.parent, run_name(out_path), written)
    shown = [files[k] for k in ("predictor", "metrics", "loss_curve", "loss_by_noise", "train_summary")]
    print(f"wrote {', '.join(str(path) for path in shown if path.exists())}")


def earlier_files(files: dict[str, Path]) -> list[str]:
    """An earlier run's files beside out_path (names): its record, or those of this run's names that exist."""
    out_path = files["predictor"]
    return run_folder.earlier_files(out_path.parent, run_name(out_path), [path.name for path in files.values()])


def side_name(out_path: Path) -> str:
    """What the side files are named from: out_path without its suffix (convnet.pth -> convnet). Runs whose out_paths
    share it (a.pth, a.pt) would share side files: one lock and one record serve them both."""
    return out_path.with_suffix("").name


def run_name(out_path: Path) -> str:
    return f"{side_name(out_path)}.train"  # its record: .convnet.train.files.json


def lock_file(out_path: Path) -> Path:
    return out_path.parent / f".{side_name(out_path)}.lock"


def staging_folder(out_path: Path) -> Path:
    return out_path.parent / f".{out_path.name}{STAGING}"


def run_files(out_path: Path) -> dict[str, Path]:
    """Every file a run writes: out_path, and beside it files named from its stem."""
    side = ("best.pth", "resume.pth", "metrics.jsonl", "loss_curve.png", "loss_by_noise.png", "train_summary.json")
    return {"predictor": out_path, **{name.split(".")[0]: out_path.with_suffix(f".{name}") for name in side}}


def check_outputs(config: SimpleNamespace, files: dict[str, Path], staged: dict[str, Path]) -> None:
    """Before anything is created: out_path is a file path, no input is an output or holds one, and no earlier
    run's files are replaced unless resume=True (an interrupted run, `staged` for an interrupted overwrite) or
    overwrite=True."""
    out_path = files["predictor"]
    if out_path.is_dir():
        raise UserError(f"out_path {str(out_path)!r} is a directory; expected a file path like convnet.pth")
    check_creatable(out_path.parent, "out_path's folder")
    check_creatable(config.cache_dir, "cache_dir")
    refuse_inputs_as_outputs({"labels_path": config.labels_path}, files.values())
    if Path(config.cache_dir).resolve() in out_path.resolve().parents:
        raise UserError(f"out_path {str(out_path)!r} is inside cache_dir {config.cache_dir!r}; expected a path outside the cache")
    model_folder = local_model_folder(config.model)
    data_folder = config.data if Path(config.data).is_dir() else None
    outputs = {"out_path": out_path, "cache_dir": config.cache_dir}
    refuse_outputs_inside_inputs(outputs, {"model": model_folder, "data": data_folder})
    if config.resume:
        if not (files["resume"].is_file() or staged["resume"].is_file()):
            raise UserError(f"resume=True but {str(files['resume'])!r} does not exist; expected a run to continue")
    elif not config.overwrite:
        # an unfinished replacement, or a run that stopped before out_path (a finished one keeps its resume state)
        unfinished = [staged["resume"]] if staged["resume"].exists() else []
        unfinished += [files["resume"]] if files["resume"].exists() and not out_path.exists() else []
        if unfinished:
            raise UserError(f"{str(unfinished[0])!r} holds an interrupted run; resume=True to finish it, or overwrite=True "
                            "to start again")
        earlier = earlier_files(files)
        if earlier:
            raise UserError(f"{str(out_path.parent / earlier[0])!r} already exists (an earlier run's output); "
                            "overwrite=True to replace it, or another out_path")


def train(
    config: SimpleNamespace, family: str, state: PartialState, dev: torch.device, labels: torch.Tensor, indices: tuple,
    files: dict[str, Path], start_time: float,
) -> None:
    """Encode (or read) the latents, then train for the remaining epochs. indices: (train, validation) from `split`;
    `family`: the model's (rcgdm/families.py), recorded in the predictor.
    With several processes (rcgdm.distributed) the net trains data-parallel and only the main process writes."""
    out_path, state_path, best_path = files["predictor"], files["resume"], files["best"]

    # --- data: cached VAE latents, a seeded train/validation split, the timestep pool
    latents, images_encoded, encode_seconds, vae_id = encode_dataset(config, state, dev)
    run_config = {**vars(config), "labels_sha256": sha256_file(config.labels_path), "vae_fingerprint": vae_id}
    sidecar = labels_sidecar(config.labels_path) or {}
    train_idx, val_idx = indices
    x_train, y_train = latents[train_idx].to(dev), labels[train_idx].to(dev)  # GPU-resident on CUDA
    x_val, y_val = latents[val_idx].to(dev), labels[val_idx].to(dev)
    reference = reference_sample(latents[train_idx], config.seed)  # stored with the predictor: inference's distribution shift
    scheduler = load_scheduler(config.model)
    scheduler.set_timesteps(config.num_inference_steps)
    timestep_pool = torch.unique(scheduler.timesteps)

    # validation sees the same noise and timesteps every epoch, so its loss is comparable across epochs
    val_generator = torch.Generator().manual_seed(config.seed + 1)
    val_inputs, _, val_timesteps = add_training_noise(scheduler, x_val, timestep_pool, val_generator)
    if not config.noise:
        val_inputs = x_val
    baseline_val = F.mse_loss(y_train.mean().expand_as(y_val), y_val).item() if len(val_idx) else None

    # --- model, optimizer, RNG (restored on resume)
    torch.manual_seed(config.seed)
    net = ThreeLayerConvNet(in_channels=latents.shape[1]).to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    if config.resume:  # every process loads the same state, so all continue alike
        history = load_state(state_path, run_config, RESUME_MUST_MATCH, net, optimizer, generator)
        state.print(f"resuming from {state_path} after epoch {len(history)}")
    main = state.is_main_process
    run = start_wandb(config) if main else None
    # several processes: DDP through accelerate averages the gradients; `net` stays the plain model that is saved
    trained_net = net
    if state.num_processes > 1:
        trained_net = Accelerator(cpu=dev.type == "cpu").prepare_model(net, device_placement=False)
    shard = (state.process_index, state.num_processes)

    where = f"device {dev}" + (f", {state.num_processes} processes" if state.num_processes > 1 else "")
    state.print(f"training on {len(train_idx)} latents {tuple(latents.shape[1:])}, validating on {len(val_idx)}, {where}")
    for epoch in range(len(history) + 1, config.num_epochs + 1):
        epoch_start = time.perf_counter()
        desc = f"epoch {epoch}/{config.num_epochs}"
        train_loss = train_epoch(trained_net, optimizer, scheduler, x_train, y_train, timestep_pool, generator,
                                 config.batch_size, desc, config.noise, shard)
        if not math.isfinite(train_loss):
            kept = f"the last good checkpoint {state_path} is kept" if history else "no checkpoint was written"
            raise UserError(f"training loss became {train_loss} in epoch {epoch}; {kept}; try a smaller lr (now {config.lr})")
        val_loss = mean_squared_error(net, val_inputs, y_val) if len(val_idx) else None
        by_noise = loss_by_noise_level(net, val_inputs, y_val, val_timesteps) if len(val_idx) and config.noise else None
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "baseline_val_loss": baseline_val,
                "val_loss_by_noise": by_noise,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        val_text = f", val {val_loss:.4f} (baseline {baseline_val:.4f})" if val_loss is not None else ""
        state.print(f"epoch {epoch}: train {history[-1]['train_loss']:.4f}{val_text}")
        if run is not None:
            run.log(history[-1])
        meta = {
            "family": family,
            "latent_channels": latents.shape[1],
            "latent_size": list(latents.shape[2:]),
            "model": config.model,
            "labels_sha256": run_config["labels_sha256"],
            "reward_model_sha256": sidecar.get("reward_model_sha256"),
            "image_size": config.image_size,
            "label_mean": labels.mean().item(),
            "label_std": labels.std().item(),
            "epochs": epoch,
            "val_loss": val_loss,
            "noised": config.noise,
        }
        if not main:
            continue
        if val_loss is not None and val_loss <= min(h["val_loss"] for h in history):
            save_torch(predictor_checkpoint(net, meta, reference), best_path)
        save_state(state_path, run_config, epoch, net, optimizer, generator, history)
        save_text("".join(json.dumps(h) + "\n" for h in history), files["metrics"])

    # --- outputs
    if not main:
        return
    plots.loss_curve(history, files["loss_curve"])
    last = history[-1]
    if last["val_loss_by_noise"] is not None:
        plots.loss_by_noise(last, files["loss_by_noise"])
    summary = {
        "images_encoded": images_encoded,
        "encode_seconds": encode_seconds,
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "baseline_val_loss": baseline_val,
        "final_val_loss_by_noise": last["val_loss_by_noise"],
        "epochs": last["epoch"],
        "seconds": time.perf_counter() - start_time,
        "config": vars(config),
        "versions": package_versions(),
    }
    save_json(summary, files["train_summary"])
    save_torch(predictor_checkpoint(net, meta, reference), out_path)  # last: a predictor at out_path is a finished run's
    if run is not None:
        run.finish()
    val_text = f"; final val {last['val_loss']:.4f} vs predict-the-mean {baseline_val:.4f}" if baseline_val is not None else ""
    print(f"latents ready in {encode_seconds:.1f}s ({images_encoded} images encoded){val_text}")
    if last["val_loss_by_noise"] is not None:
        buckets = ", ".join(f"{name} {loss:.4f}" for name, loss in last["val_loss_by_noise"].items() if loss is not None)
        print(f"validation by noise level: {buckets}")


if __name__ == "__main__":
    run_main(main)
