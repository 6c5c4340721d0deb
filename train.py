"""Step 2 of the paper: train the reward predictor mu(x) on noisy, frozen SD VAE latents.

Each image is resized to `image_size`, scaled to [-1, 1] and encoded once by the VAE (one
latent_dist sample times the scaling factor; cached in `cache_dir`). Every training step noises
each latent with `scheduler.add_noise` at a timestep drawn uniformly from the `num_inference_steps`
schedule, with fresh noise, and a 3-layer residual ConvNet learns to predict the image's reward
label from the noisy latent (it is not told t). MSE loss, Adam. For SDXL the same, on SDXL's VAE; for
SD3 and FLUX the VAE's shift and scaling factors apply and the noise is flow matching's, (1 - sigma) x0 +
sigma eps at the sigmas of the model's `num_inference_steps` schedule at `image_size` (FLUX.1-dev's shift
depends on it) (rcgdm/sampling/families.py, rcgdm/training.py). FLUX's latents are the unpacked (16, h, w) ones.

predictor="calibrated" trains, in place of the paper's net, the same ConvNet told the noise level (alpha_bar, or
sigma for SD3 and FLUX) with a second output, log Var(y | x_t), learned by the Gaussian likelihood of the labels with
the mean held fixed (rcgdm.training.predictor_loss: the mean fits exactly as the paper's does). `inference.py
--guidance posterior` then follows its likelihood, grad log N(target; mu(x_t, t), v(x_t, t)), at every step, the
first of a schedule with no signal (zero terminal SNR, FLUX.1-schnell's sigma = 1) included. Validation reports the
variance it predicts beside the squared error it makes, by noise level (its calibration).

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
from accelerate import Accelerator, PartialState

from rcgdm import distributed, plots
from rcgdm.cli import MAX_SEED, UserError, run_main, writable_dir
from rcgdm.config import read
from rcgdm.data import check_num_data, open_source
from rcgdm.files import run_folder
from rcgdm.files.atomic import remove_leftovers, save_json, save_text, save_torch
from rcgdm.files.locking import refuse_if_locked
from rcgdm.files.output_checks import refuse_nested_runs
from rcgdm.files.provenance import package_versions
from rcgdm.models import load_scheduler, model_facts
from rcgdm.predictor import ThreeLayerConvNet, make_predictor, predictor_checkpoint
from rcgdm.sampling.families import FAMILIES
from rcgdm.sampling.posterior import fit_curve, posterior_fields
from rcgdm.sampling.schedulers import check_step_count, is_flow, token_count
from rcgdm.training import (
    TrainingData,
    load_labels,
    loss_by_noise_level,
    noise_level,
    prepare_data,
    split,
    train_epoch,
    validation_outputs,
)
from rcgdm.training_outputs import PredictorFiles
from rcgdm.training_state import load_state, read_state, save_state

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
num_inference_steps = 0  # training noise is drawn at the timesteps of this many sampling steps; 0: the family's own
# (SD and SDXL 50, SD3 and FLUX.1-dev 28, FLUX.1-schnell 4: the levels its sampler visits by default)
val_fraction = 0.02  # held-out share for validation; 0 = train on everything, as the original
seed = 0  # model init, split, noise, latent samples
device = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
cache_dir = "./cache"  # latent cache: a folder of shards per data/VAE/size/seed (rcgdm/latents.py)
encode_batch_size = 32
latents_per_shard = 1024  # images per cache shard (rounded up to whole encode batches); a damaged shard is re-encoded alone
latents_in_memory_gb = 4.0  # training latents up to this size are held in memory (on the device); larger ones stream
noise = True  # train on noisy latents x_t (the paper); False: clean latents, for inference.py --grad_path x0
predictor = "paper"  # paper: the level-blind ConvNet; calibrated: told the noise level, predicting Var(y | x_t) too
resume = False  # continue from <out_path stem>.resume.pth
overwrite = False  # replace an earlier run's files at out_path (otherwise refused)
check_provenance = True  # refuse labels whose sidecar (.json beside them) names other data than `data`
wandb = False  # log to Weights & Biases (needs `pip install wandb`)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if k.islower() and k[0] != "_" and isinstance(v, (bool, int, float, str))]
# a resumed run must agree with its checkpoint on everything but num_epochs, device, paths and logging
RESUME_MUST_MATCH = ("lr", "num_data", "batch_size", "model", "data", "image_size", "num_inference_steps", "val_fraction", "seed",
                     "noise", "labels_sha256", "vae_fingerprint")  # the last two: what the files hold

PREDICTORS = {"paper": "ThreeLayerConvNet", "calibrated": "CalibratedConvNet"}  # train.py's names -> the checkpoint's arch
CHECKS = {
    "lr": (lambda v: v > 0, "a number > 0"),
    "num_data": (lambda v: v >= 1, "an integer >= 1"),
    "num_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "image_size": (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, >= 8"),
    "num_inference_steps": (lambda v: 0 <= v <= 1000, "an integer from 1 to 1000, or 0 for the model family's own"),
    "val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"a seed from 0 to {MAX_SEED}"),
    "encode_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "latents_per_shard": (lambda v: v >= 1, "an integer >= 1"),
    "latents_in_memory_gb": (lambda v: v >= 0, "a number >= 0 (0: always read from the shards)"),
    "predictor": (lambda v: v in PREDICTORS, f"one of {', '.join(PREDICTORS)}"),
}


PATHS = ("model", "data", "data_root", "labels_path", "out_path", "cache_dir")


def read_config(argv: list[str]) -> SimpleNamespace:
    config = read({k: globals()[k] for k in config_keys}, argv, __doc__)
    for key, (ok, expected) in CHECKS.items():
        if not ok(config[key]):
            raise UserError(f"{key}={config[key]!r} is out of range; expected {expected}")
    for key in PATHS:  # an empty path would silently mean the working folder
        if not config[key].strip():
            raise UserError(f"{key}={config[key]!r} is empty; expected a path or name")
    if config["predictor"] == "calibrated" and not config["noise"]:
        raise UserError("predictor='calibrated' with noise=False: a calibrated predictor learns each noise level's "
                        "uncertainty; expected noise=True, or predictor='paper' for clean latents")
    return SimpleNamespace(**config)


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
    files = PredictorFiles(Path(config.out_path))
    what = f"out_path {str(files.out_path)!r}"
    if state.is_main_process:  # a running run's files are not an earlier run's (only the main process ever locks)
        refuse_if_locked(files.lock, what)
        refuse_nested_runs(files.folder, "out_path's folder", below=False)
        run_folder.recover(files.folder, files.run, files.lock, what)  # a publish cut short by a kill is finished
    files.check(config)
    labels = load_labels(config.labels_path, config.num_data)
    indices = split(config.num_data, config.val_fraction, config.seed)  # an empty side fails here, before any encoding
    facts = model_facts(config.model)  # configs only: a model that cannot be had fails before anything is created
    config.num_inference_steps = config.num_inference_steps or FAMILIES[facts["family"]].steps  # recorded as resolved
    check_image_size(config.image_size, facts)
    latent_size = (config.image_size // facts["vae_scale_factor"],) * 2  # a config only: its schedule must exist
    check_step_count(load_scheduler(config.model), config.num_inference_steps, FAMILIES[facts["family"]],
                     token_count(latent_size, facts["patch_size"]))
    if config.data != "cifar10":  # cheap to open (cifar10 is downloaded once, later, by the main process first)
        check_num_data(config.num_data, open_source(config.data, config.data_root))
    writable_dir(files.folder, "out_path's folder")
    writable_dir(config.cache_dir, "cache_dir")
    with distributed.main_only_lock(state, files.lock, what):
        if state.is_main_process:  # again, holding the lock: another run may have written meanwhile
            files.check(config)
            remove_leftovers(files.folder)  # temporary files of killed runs
        writes = files.where_to_write(config, state.is_main_process)
        if config.resume:  # checked in full before any encoding
            check_resume_state(writes["resume"], facts, config)
        train(config, facts, state, dev, labels, indices, writes, start_time)
        if state.is_main_process:
            files.finish(writes)
    distributed.finish(state)


def check_image_size(image_size: int, facts: dict) -> None:
    """UserError unless images of `image_size` make latents the model's transformer can cut into whole patches (SD3's
    patch size; FLUX packs 2x2)."""
    step = facts["vae_scale_factor"] * facts["patch_size"]
    if image_size % step:
        raise UserError(f"image_size={image_size} is not a multiple of {step}; expected a multiple of {step} for this "
                        f"model (latent patches of {facts['patch_size']})")


def check_resume_state(path: Path, facts: dict, config: SimpleNamespace) -> None:
    """UserError unless the saved state at `path` is whole, trains this kind of net and has epochs left to train."""
    net = make_predictor(PREDICTORS[config.predictor], facts["in_channels"], facts["family"])
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    epoch = len(read_state(path, net, optimizer, torch.Generator(), config.predictor)["history"])
    if epoch >= config.num_epochs:
        raise UserError(f"resume=True: {str(path)!r} already finished epoch {epoch} of num_epochs={config.num_epochs}; "
                        "expected a larger num_epochs to train further")


def train(config: SimpleNamespace, facts: dict, state: PartialState, dev: torch.device, labels: torch.Tensor,
          indices: tuple, files: dict[str, Path], start_time: float) -> None:
    """Encode (or read) the latents, then train for the remaining epochs and write the outputs. indices: (train,
    validation) from `split`; `facts`: the model's (rcgdm.models.model_facts), whose family's latents the predictor
    records. With several processes (rcgdm.distributed) the net trains data-parallel and only the main process writes."""
    data = prepare_data(config, state, dev, labels, indices, facts)
    family = FAMILIES[facts["family"]].latent_space
    torch.manual_seed(config.seed)  # model init
    net = make_predictor(PREDICTORS[config.predictor], data.channels, facts["family"]).to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)  # the training noise and timesteps
    history: list[dict] = []
    if config.resume:  # every process loads the same state, so all continue alike
        history = load_state(files["resume"], data.run_config, RESUME_MUST_MATCH, net, optimizer, generator)
        state.print(f"resuming from {files['resume']} after epoch {len(history)}")
    run = start_wandb(config) if state.is_main_process else None
    meta = run_epochs(config, data, (net, optimizer, generator), history, state, dev, files, run, family)
    if state.is_main_process:
        write_outputs(config, data, net, history, meta, files, time.perf_counter() - start_time)
        if run is not None:
            run.finish()


def run_epochs(config: SimpleNamespace, data: TrainingData, model: tuple, history: list[dict], state: PartialState,
               dev: torch.device, files: dict[str, Path], run, family: str) -> dict:
    """Train the epochs after those in `history` (appended to it), saving the resume state, the best predictor and the
    metrics after each -> the predictor's metadata at the last epoch."""
    net, optimizer, generator = model
    # several processes: DDP through accelerate averages the gradients; `net` stays the plain model that is saved
    trained_net = net
    if state.num_processes > 1:
        trained_net = Accelerator(cpu=dev.type == "cpu").prepare_model(net, device_placement=False)
    shard, validating = (state.process_index, state.num_processes), len(data.y_val) > 0
    where = f"device {dev}" + (f", {state.num_processes} processes" if state.num_processes > 1 else "")
    state.print(f"training on {len(data.x_train)} latents {tuple(data.x_train.shape[1:])}, validating on "
                f"{len(data.y_val)}, {where}")
    meta = {}
    for epoch in range(len(history) + 1, config.num_epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = train_epoch(trained_net, optimizer, data.scheduler, data.x_train, data.y_train, data.timestep_pool,
                                 generator, config.batch_size, f"epoch {epoch}/{config.num_epochs}", config.noise, shard)
        if not math.isfinite(train_loss):
            kept = f"the last good checkpoint {files['resume']} is kept" if history else "no checkpoint was written"
            raise UserError(f"training loss became {train_loss} in epoch {epoch}; {kept}; try a smaller lr (now {config.lr})")
        levels = noise_level(data.scheduler, data.val_timesteps) if config.noise else None
        errors, variances = validation_outputs(net, data.val_inputs, data.y_val, levels) if validating else (None, None)
        val_loss = errors.double().mean().item() if validating else None
        by_noise, variance_by_noise, curve = None, None, None
        if validating and config.noise:  # by noise level, and the posterior strength's curve (rcgdm/sampling/posterior.py)
            by_noise = loss_by_noise_level(errors, data.val_timesteps)
            if variances is not None:  # the calibrated predictor's own variance: its posterior needs no curve
                variance_by_noise = loss_by_noise_level(variances, data.val_timesteps)
            elif len(errors) >= 2:
                curve = fit_curve(levels, errors, is_flow(data.scheduler))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "baseline_val_loss": data.baseline_val,
                        "val_loss_by_noise": by_noise, "val_variance_by_noise": variance_by_noise,
                        "seconds": time.perf_counter() - epoch_start})
        val_text = f", val {val_loss:.4f} (baseline {data.baseline_val:.4f})" if val_loss is not None else ""
        state.print(f"epoch {epoch}: train {train_loss:.4f}{val_text}")
        if run is not None:
            run.log(history[-1])
        stats = data.label_stats
        meta = {"family": family, "latent_channels": data.channels, "latent_size": list(data.x_train.shape[2:]),
                "model": config.model, "labels_sha256": stats["labels_sha256"],
                "reward_model_sha256": stats["reward_model_sha256"], "image_size": config.image_size,
                "label_mean": stats["label_mean"], "label_std": stats["label_std"], "epochs": epoch, "val_loss": val_loss,
                "noised": config.noise, **posterior_fields(curve)}
        if state.is_main_process:
            if val_loss is not None and val_loss <= min(h["val_loss"] for h in history):
                save_torch(predictor_checkpoint(net, meta, data.reference), files["best"])
            save_state(files["resume"], data.run_config, epoch, net, optimizer, generator, history)
            save_text("".join(json.dumps(h) + "\n" for h in history), files["metrics"])
    return meta


def write_outputs(config: SimpleNamespace, data: TrainingData, net: ThreeLayerConvNet, history: list[dict], meta: dict,
                  files: dict[str, Path], seconds: float) -> None:
    """The loss figures, the summary and, last (a predictor at out_path is a finished run's), the predictor."""
    plots.loss_curve(history, files["loss_curve"])
    last = history[-1]
    if last["val_loss_by_noise"] is not None:
        plots.loss_by_noise(last, files["loss_by_noise"])
    summary = {"images_encoded": data.images_encoded, "encode_seconds": data.encode_seconds,
               "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
               "baseline_val_loss": data.baseline_val, "final_val_loss_by_noise": last["val_loss_by_noise"],
               "final_val_variance_by_noise": last.get("val_variance_by_noise"), "calibration_by_noise": calibration(last),
               "epochs": last["epoch"], "seconds": seconds, "config": vars(config), "versions": package_versions()}
    save_json(summary, files["train_summary"])
    save_torch(predictor_checkpoint(net, meta, data.reference), files["predictor"])
    baseline = data.baseline_val
    val_text = f"; final val {last['val_loss']:.4f} vs predict-the-mean {baseline:.4f}" if baseline is not None else ""
    print(f"latents ready in {data.encode_seconds:.1f}s ({data.images_encoded} images encoded){val_text}")
    if last["val_loss_by_noise"] is not None:
        buckets = ", ".join(f"{name} {loss:.4f}" for name, loss in last["val_loss_by_noise"].items() if loss is not None)
        print(f"validation by noise level: {buckets}")
    if summary["calibration_by_noise"] is not None:
        ratios = ", ".join(f"{name} {ratio:.2f}" for name, ratio in summary["calibration_by_noise"].items() if ratio is not None)
        print(f"predicted variance / squared error by noise level (1 is calibrated): {ratios}")


def calibration(epoch: dict) -> dict | None:
    """{bucket: the variance the calibrated predictor predicted / the squared error it made, on validation} (None
    where a bucket is empty), or None for a predictor without variance."""
    variances, errors = epoch.get("val_variance_by_noise"), epoch["val_loss_by_noise"]
    if variances is None or errors is None:
        return None
    return {name: None if variances[name] is None or not errors[name] else variances[name] / errors[name] for name in errors}


if __name__ == "__main__":
    run_main(main)
