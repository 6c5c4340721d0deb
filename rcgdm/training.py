"""Pieces of train.py's loop: labels, the split, noising, evaluation and the resumable state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from tqdm import tqdm

from rcgdm.cli import InputError, UserError
from rcgdm.files.atomic import save_torch
from rcgdm.files.checkpoint import check_finite_state, load_checkpoint
from rcgdm.schedulers import is_flow

STATE_FORMAT = "rcgdm.train-state/1"


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
    if is_flow(scheduler):
        sigma = (timesteps.to(x0.device, x0.dtype) / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise, noise, timesteps
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device)), noise, timesteps


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
) -> float:
    """One pass over latents x (N, C, h, w) and labels y (N, 1), both on the training device, in a
    random order; each step noises its latents afresh (unless noised=False: clean latents, for the
    x0 gradient path). -> mean training MSE (nan/inf once it diverges).

    shard=(k, n), for n data-parallel processes (net wrapped in DDP, same generator state in each):
    every process draws the same batches and noise, and process k learns on samples k, k+n, ... of
    each batch. Its summed error is scaled by n / batch length, so DDP's mean over processes is the
    whole batch's mean gradient (BatchNorm statistics stay per process, as usual in DDP)."""
    rank, world = shard
    net.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = torch.zeros((), device=x.device)  # summed on the device: no host sync per step
    trained = 0
    steps = range(0, len(order), batch_size)
    for number, start in enumerate(tqdm(steps, desc=desc, leave=False, unit="step", disable=rank != 0)):
        batch = order[start : start + batch_size]
        inputs = add_training_noise(scheduler, x[batch], timestep_pool, generator)[0] if noised else x[batch]
        if len(batch) < world:
            continue  # a last batch too small to give every process a sample (only with several processes)
        errors = F.mse_loss(net(inputs[rank::world]), y[batch][rank::world], reduction="sum")
        loss = errors * (world / len(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += errors.detach()
        trained += len(batch)
        if number % 100 == 99 and not torch.isfinite(reduce(total, "sum")):
            break  # diverged (in any process): no use finishing the epoch
    return reduce(total, "sum").item() / trained


@torch.no_grad()
def mean_squared_error(net: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """MSE of net(inputs) against labels, in eval mode."""
    was_training = net.training
    net.eval()
    total = sum(
        F.mse_loss(net(inputs[i : i + batch_size]), labels[i : i + batch_size], reduction="sum").item()
        for i in range(0, len(inputs), batch_size)
    )
    net.train(was_training)
    return total / len(inputs)


NOISE_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # training timesteps; the first is the least noisy


def bucket_name(low: int, high: int) -> str:
    return f"t {low}-{high - 1}"


@torch.no_grad()
def loss_by_noise_level(net: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor) -> dict:
    """Validation MSE per timestep bucket (NOISE_BUCKETS) -> {"t 0-249": mse or None when empty, ...}.
    High-noise timesteps cap what any predictor can reach; this shows where the predictor stands."""
    timesteps = timesteps.to(inputs.device)
    out = {}
    for low, high in NOISE_BUCKETS:
        mine = (timesteps >= low) & (timesteps < high)
        out[bucket_name(low, high)] = mean_squared_error(net, inputs[mine], labels[mine]) if mine.any() else None
    return out


def save_state(path: Path, config: dict, epoch: int, net, optimizer, generator: torch.Generator, history: list) -> None:
    save_torch(
        {
            "format": STATE_FORMAT,
            "config": config,
            "epoch": epoch,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "history": history,
        },
        path,
    )


def load_state(path: Path, config: dict, must_match: tuple[str, ...], net, optimizer, generator: torch.Generator) -> list:
    """Restore `net`, `optimizer` and `generator` from a saved training state (checked in full: `read_state`) whose
    config agrees with `config` on `must_match` -> the history of its epochs."""
    state = read_state(path, net, optimizer, generator)
    for key in must_match:
        if state["config"].get(key) != config[key]:
            raise UserError(
                f"resume=True: {str(path)!r} was trained with {key}={state['config'].get(key)!r}, not {config[key]!r}; "
                "use the same settings or resume=False"
            )
    return state["history"]


def read_state(path: Path, net, optimizer, generator: torch.Generator) -> dict:
    """A saved training state, every field checked (types, the net's and optimizer's shapes, finite values, the RNG
    state, one history entry per epoch) and loaded into `net`, `optimizer` and `generator`."""
    state = load_checkpoint(path, STATE_FORMAT)

    def bad(field: str, detail: str) -> UserError:
        return UserError(f"resume state {str(path)!r}: field {field!r} {detail}; expected an undamaged file as train.py "
                         "writes, or overwrite=True to start again")

    expected = {"config": dict, "epoch": int, "model": dict, "optimizer": dict, "generator": torch.Tensor, "history": list}
    for field, kind in expected.items():
        if not isinstance(state.get(field), kind) or (field == "epoch" and state[field] < 1):
            raise bad(field, f"is not a {kind.__name__}")
    for field, target in (("model", net), ("optimizer", optimizer)):
        try:
            target.load_state_dict(state[field])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise bad(field, f"does not fit the predictor ({(str(err).splitlines() or [''])[0][:120]})") from None
    check_finite_state(net.state_dict(), path, "resume state")
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if not torch.is_tensor(value) or (name != "step" and value.shape != param.shape) or not torch.isfinite(value).all():
                raise bad("optimizer", f"holds a {name!r} that does not fit its parameter (shape, or NaN/inf)")
    if state["generator"].dtype != torch.uint8 or state["generator"].shape != generator.get_state().shape:
        raise bad("generator", "is not a CPU generator's state")
    generator.set_state(state["generator"])
    for epoch, entry in enumerate(state["history"], start=1):
        if not _history_entry(entry, epoch):
            raise bad("history", f"entry {epoch} is not epoch {epoch}'s finite losses")
    if len(state["history"]) != state["epoch"]:
        raise bad("epoch", f"is {state['epoch']}, but the history holds {len(state['history'])} epochs")
    return state


def _history_entry(entry, epoch: int) -> bool:
    def finite(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    return (isinstance(entry, dict) and entry.get("epoch") == epoch and finite(entry.get("train_loss"))
            and (entry.get("val_loss") is None or finite(entry["val_loss"])))
