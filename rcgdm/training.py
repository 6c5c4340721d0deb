"""Pieces of train.py's loop: labels, the latents, the split, noising and evaluation (its resume state:
rcgdm/training_state.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import reduce
from tqdm import tqdm

from rcgdm.cli import InputError, UserError
from rcgdm.data import check_num_data, open_source
from rcgdm.files.provenance import sha256_file
from rcgdm.latent_shards import LatentRows, ShardedLatents
from rcgdm.latents import LatentSpec, cached_latents, vae_fingerprint
from rcgdm.models import load_scheduler, load_vae
from rcgdm.predictor import reference_sample
from rcgdm.sampling.families import FAMILIES
from rcgdm.sampling.guidance import predicts_variance, takes_level
from rcgdm.sampling.schedulers import is_flow, set_schedule, token_count


def load_labels(path: str | Path, num_data: int) -> torch.Tensor:
    """The first `num_data` rows of a labels .npy (float, (M, 1) or (M,), finite) -> float32 (num_data, 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("labels_path", f"{str(path)!r} does not exist; expected the .npy written by fake_dataset.py")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError("labels_path", f"{str(path)!r} is not a readable .npy file ({str(err)[:120]})") from None
    if not isinstance(labels, np.ndarray):  # np.load opens any zip archive (a .npz, a .pth) as an NpzFile
        labels.close()
        raise InputError("labels_path", f"{str(path)!r} is a zip archive (a .npz or .pth?), not a .npy file; expected the .npy "
                        "written by fake_dataset.py")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.dtype.kind not in "fiu":
        raise InputError("labels_path", f"{str(path)!r} holds {labels.dtype} {labels.shape}; expected numbers of shape (N, 1)")
    if labels.shape[0] < num_data:
        raise InputError("labels_path", f"{str(path)!r} has {labels.shape[0]} rows; num_data={num_data} needs at least that many")
    labels = labels[:num_data].astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(labels[:, 0]))
    if bad.size:
        raise InputError("labels_path", f"{str(path)!r} has non-finite labels (first at row {bad[0]}); expected finite numbers")
    return torch.from_numpy(labels)


def labels_sidecar(path: str | Path) -> dict | None:
    """The provenance fake_dataset.py wrote beside the labels (same name, .json), or None when there is none."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"labels sidecar {str(sidecar)!r} is not readable JSON ({type(err).__name__}); expected the file "
                        "fake_dataset.py wrote, or none") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, ""), str) for k in ("data", "reward_model_sha256")):
        raise UserError(f"labels sidecar {str(sidecar)!r}: fields 'data' and 'reward_model_sha256' must be strings")
    return data


def check_labels_source(path: str | Path, identity: str, data: str, enforce: bool, speak: bool = True) -> None:
    """Labels made from other images than `data` are refused (unless enforce=False); without a sidecar, say so once."""
    sidecar = labels_sidecar(path)
    if sidecar is None:
        if speak:
            print(f"note: labels_path {str(path)!r} has no sidecar .json, so its data source cannot be verified")
        return
    recorded = sidecar.get("data")
    if enforce and recorded is not None and recorded != identity:
        raise InputError("labels_path", f"{str(path)!r} was made from {recorded!r} (its sidecar says), not data={data!r} "
                        f"({identity}); expected the same data, or check_provenance=False")


def split(num_data: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random `val_fraction` of 0..num_data-1 is held out."""
    num_val = round(num_data * val_fraction)
    if val_fraction > 0 and not 1 <= num_val < num_data:
        raise UserError(
            f"val_fraction={val_fraction} holds out {num_val} of num_data={num_data} images; expected at least 1 on each side"
        )
    order = torch.randperm(num_data, generator=torch.Generator().manual_seed(seed))
    val = order[:num_val].sort().values
    train = order[num_val:].sort().values
    return train, val


def add_training_noise(scheduler, x0: torch.Tensor, timestep_pool: torch.Tensor, generator: torch.Generator):
    """Noise each latent at a timestep drawn uniformly from `timestep_pool`, with fresh Gaussian noise, as the model's
    sampler sees its latents: scheduler.add_noise(x0, noise, t) = sqrt(a_t) x0 + sqrt(1 - a_t) noise for a diffusion
    scheduler; (1 - sigma) x0 + sigma noise, sigma = t / num_train_timesteps, for a flow-matching one (SD3).

    x0 (B, C, h, w) -> (noisy latents (B, C, h, w), noise, timesteps (B,)).
    """
    picks = torch.randint(len(timestep_pool), (x0.shape[0],), generator=generator)
    timesteps = timestep_pool[picks]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return noised(scheduler, x0, noise, timesteps), noise, timesteps


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x0 (B, ...) noised with `noise` at `timesteps` (B,), as the model's sampler sees it (add_training_noise)."""
    if is_flow(scheduler):
        sigma = noise_level(scheduler, timesteps).to(x0.device, x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return (1 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device))


def noise_level(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The level add_training_noise noises at, per timestep (float64, on the CPU): alpha_bar_t, or sigma for flow."""
    timesteps = timesteps.detach().cpu()
    if is_flow(scheduler):
        return timesteps.double() / scheduler.config.num_train_timesteps
    return scheduler.alphas_cumprod.detach().cpu().double()[timesteps.long()]


def train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    timestep_pool: torch.Tensor,
    generator: torch.Generator,
    batch_size: int,
    desc: str = "epoch",
    noised: bool = True,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> float:
    """One pass over latents x (N, C, h, w; a tensor on the training device, or LatentRows read from the shards) and
    labels y (N, 1) on the training device, in a random order; each step noises its latents afresh (unless
    noised=False: clean latents, for the x0 gradient path). -> mean training MSE (nan/inf once it diverges).

    shard=(k, n), for n data-parallel processes (net wrapped in DDP, same generator state in each):
    every process draws the same batches and noise, and process k learns on samples k, k+n, ... of
    each batch. Its summed error is scaled by n / batch length, so DDP's mean over processes is the
    whole batch's mean gradient (BatchNorm statistics stay per process, as usual in DDP)."""
    rank, world = shard
    wants_level = noised and takes_level(getattr(net, "module", net))  # .module: under DDP
    net.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = torch.zeros((), device=y.device)  # summed on the device: no host sync per step
    trained = 0
    steps = range(0, len(order), batch_size)
    for number, start in enumerate(tqdm(steps, desc=desc, leave=False, unit="step", disable=rank != 0 or not progress)):
        batch = order[start : start + batch_size]
        clean = x[batch].to(y.device)  # a batch read from the shards comes from the CPU
        inputs, levels = clean, None
        if noised:
            inputs, _, timesteps = add_training_noise(scheduler, clean, timestep_pool, generator)
            if wants_level:  # a level-blind net needs none: no copy to the device per step
                levels = noise_level(scheduler, timesteps).to(inputs.device, inputs.dtype)
        if len(batch) < world:
            continue  # a last batch too small to give every process a sample (only with several processes)
        mine = slice(rank, None, world)
        summed, errors = predictor_loss(predict(net, inputs[mine], None if levels is None else levels[mine]), y[batch][mine])
        loss = summed * (world / len(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += errors.detach()
        trained += len(batch)
        if number % 100 == 99 and not torch.isfinite(reduce(total, "sum")):
            break  # diverged (in any process): no use finishing the epoch
    return reduce(total, "sum").item() / trained


def predict(net: torch.nn.Module, inputs: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """net's output (B, 1), or (B, 2) for a net that predicts its variance, on inputs (B, ...) at their noise levels
    (B,): told them only if it takes the level (None: clean inputs, the net's own clean level)."""
    return net(inputs, levels) if takes_level(getattr(net, "module", net)) else net(inputs)  # .module: under DDP


def predictor_loss(output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the summed squared error of the mean) for outputs (B, 1) or (B, 2) and labels (B, 1).

    A second output column, log v, is trained by the Gaussian likelihood of the labels with the mean detached:
    1/2 [(y - mu)^2 / v + log v]. The mean's gradient is then exactly the MSE's (it fits as the paper's predictor does,
    where a joint likelihood would down-weight the hard, noisy inputs), and v's minimiser at each input is the
    expected squared error of that mean there: Var(y | x_t) plus the predictor's own error, calibrated."""
    squared = (output[:, :1] - labels).pow(2)
    errors = squared.sum()
    if output.shape[1] == 1:
        return errors, errors
    log_v = output[:, 1:2]
    return errors + 0.5 * (squared.detach() * torch.exp(-log_v) + log_v).sum(), errors


NOISE_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # training timesteps; the first is the least noisy


def bucket_name(low: int, high: int) -> str:
    return f"t {low}-{high - 1}"


@torch.no_grad()
def validation_outputs(net: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, levels: torch.Tensor | None,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mu(inputs) - labels)^2 per input (N,) and, for a net that predicts its variance, the variance it predicts
    (N,), else None; in eval mode. `levels` (N,): each input's noise level (None: clean inputs)."""
    was_training = net.training
    net.eval()
    outputs = torch.cat([predict(net, inputs[i : i + batch_size], None if levels is None else levels[i : i + batch_size])
                         for i in range(0, len(inputs), batch_size)])
    net.train(was_training)
    errors = (outputs[:, 0] - labels.reshape(-1)).pow(2)
    return errors, outputs[:, 1].exp() if predicts_variance(net) else None


def loss_by_noise_level(errors: torch.Tensor, timesteps: torch.Tensor) -> dict:
    """Validation MSE per timestep bucket (NOISE_BUCKETS) from each input's squared error (N,) and timestep (N,)
    -> {"t 0-249": mse or None when empty, ...}. High-noise timesteps cap what any predictor can reach; this shows
    where the predictor stands."""
    timesteps = timesteps.to(errors.device)
    out = {}
    for low, high in NOISE_BUCKETS:
        mine = (timesteps >= low) & (timesteps < high)
        out[bucket_name(low, high)] = errors[mine].mean().item() if mine.any() else None
    return out


def encode_dataset(config: SimpleNamespace, state: PartialState, dev: torch.device) -> tuple[ShardedLatents, int, float, str]:
    """(the latents of images 0..N-1, read from the cache's shards; images encoded now; seconds from the VAE's load to
    the latents; the VAE's fingerprint)."""
    with state.main_process_first():  # CIFAR-10 and the VAE are downloaded once
        source = open_source(config.data, config.data_root)
        check_num_data(config.num_data, source)
        check_labels_source(config.labels_path, source.identity, config.data, config.check_provenance, state.is_main_process)
        vae = load_vae(config.model, torch.float16 if dev.type == "cuda" else torch.float32)
    start = time.perf_counter()
    spec = LatentSpec(vae_fingerprint(vae), source.identity, config.num_data, config.image_size, config.seed)
    latents, encoded = cached_latents(vae.to(dev), source, spec, config.cache_dir, config.encode_batch_size, dev, state,
                                      config.latents_per_shard)
    return latents, encoded, time.perf_counter() - start, spec.vae


@dataclass(frozen=True)
class TrainingData:
    """The latents and labels of a run, split, on the training device, and what is recorded with them."""

    x_train: torch.Tensor | LatentRows  # (N_train, C, h, w) clean latents: in memory on the device, or read from shards
    y_train: torch.Tensor  # (N_train, 1) labels
    y_val: torch.Tensor  # (N_val, 1)
    val_inputs: torch.Tensor  # (N_val, C, h, w): noised once, with a fixed seed, so epochs are comparable
    val_timesteps: torch.Tensor  # (N_val,) the timestep each validation latent was noised at
    baseline_val: float | None  # validation MSE of predicting the training labels' mean
    scheduler: object  # the noising scheduler, its timesteps set
    timestep_pool: torch.Tensor  # the timesteps training noise is drawn from
    reference: torch.Tensor  # up to 512 training latents, stored with the predictor (inference's distribution shift)
    run_config: dict  # the config and what the files hold (labels' sha256, the VAE's fingerprint): a resume must match
    label_stats: dict  # what the predictor records about the labels: mean, std, their sha256, their reward model's
    images_encoded: int
    encode_seconds: float

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]


def training_latents(latents: ShardedLatents, rows: torch.Tensor, in_memory_gb: float, dev: torch.device,
                     state: PartialState) -> torch.Tensor | LatentRows:
    """The training latents: in memory on the device (GPU-resident on CUDA) if they fit in `in_memory_gb`, else read
    from the shards batch by batch (memory then holds one batch, whatever the number of images). Both give the same
    batches, value for value."""
    size_gb = len(rows) * latents.row_bytes / 2**30
    if size_gb <= in_memory_gb:
        return latents[rows].to(dev)
    state.print(f"training latents: {size_gb:.2f} GB > latents_in_memory_gb={in_memory_gb:g}: read from "
                f"{len(latents.ranges)} shards batch by batch")
    return LatentRows(latents, rows)


def noising_schedule(model: str, facts: dict, steps: int, latent_size: tuple[int, int]):
    """The scheduler training noises with, its timesteps those the model's sampler visits in `steps` steps on latents of
    `latent_size` (h, w) (a flow schedule with dynamic shifting depends on it). `facts`: rcgdm.models.model_facts."""
    scheduler = load_scheduler(model)
    set_schedule(scheduler, steps, FAMILIES[facts["family"]], token_count(latent_size, facts["patch_size"]))
    return scheduler


def prepare_data(config: SimpleNamespace, state: PartialState, dev: torch.device, labels: torch.Tensor,
                 indices: tuple, facts: dict) -> TrainingData:
    """Cached VAE latents, the seeded train/validation split, the timestep pool (the timesteps of the model's
    `num_inference_steps` schedule at this resolution, as its sampler visits them) and the fixed validation noise.
    `facts`: the model's, rcgdm.models.model_facts."""
    latents, images_encoded, encode_seconds, vae_id = encode_dataset(config, state, dev)
    run_config = {**vars(config), "labels_sha256": sha256_file(config.labels_path), "vae_fingerprint": vae_id}
    train_idx, val_idx = indices
    x_train, y_train = training_latents(latents, train_idx, config.latents_in_memory_gb, dev, state), labels[train_idx].to(dev)
    x_val, y_val = latents[val_idx].to(dev), labels[val_idx].to(dev)  # the validation slice: in memory, as ever
    reference = reference_sample(LatentRows(latents, train_idx), config.seed)
    scheduler = noising_schedule(config.model, facts, config.num_inference_steps, latents.shape[-2:])
    timestep_pool = torch.unique(scheduler.timesteps)
    val_generator = torch.Generator().manual_seed(config.seed + 1)
    val_inputs, _, val_timesteps = add_training_noise(scheduler, x_val, timestep_pool, val_generator)
    baseline_val = F.mse_loss(y_train.mean().expand_as(y_val), y_val).item() if len(val_idx) else None
    label_stats = {"labels_sha256": run_config["labels_sha256"], "label_mean": labels.mean().item(),
                   "label_std": labels.std().item(),
                   "reward_model_sha256": (labels_sidecar(config.labels_path) or {}).get("reward_model_sha256")}
    return TrainingData(x_train, y_train, y_val, val_inputs if config.noise else x_val, val_timesteps, baseline_val,
                        scheduler, timestep_pool, reference, run_config, label_stats, images_encoded, encode_seconds)
