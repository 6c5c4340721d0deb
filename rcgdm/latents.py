"""The latent cache: every image is encoded by the VAE once; later runs encode zero images.

The cache of a run is a folder ``latents-<key>/`` of shards, each the float32 latents (rows, C, h, w) of a run of
consecutive images, already in the denoiser's scale (times the VAE's scaling factor, less its shift factor first for SD3
and FLUX); rcgdm/latent_shards.py has the format and the reader. Its key hashes everything that changes the latents: the
VAE's config and weights, the data source's identity, N, the image size and the seed. Shards are checked on every
load; a missing or damaged shard is encoded again alone. Several processes each encode their own shards.

A single-file cache ``latents-<key>.safetensors`` of an earlier version is read and split into shards (said in one
line), or, if damaged, dropped and encoded afresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from rcgdm.cli import UserError
from rcgdm.data import ImageSource, load_batch
from rcgdm.distributed import batches, main_only_lock, my_share
from rcgdm.latent_shards import ShardedLatents, shard_path, shard_problem, write_shard
from rcgdm.sampling.latent_scaling import for_denoiser
from rcgdm.seeds import image_generators

CACHE_FORMAT = "rcgdm.latents/1"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and weights: a model id alone could point at changed weights."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LatentSpec:
    """Everything that changes the cached latents."""

    vae: str
    data: str
    num_data: int
    image_size: int
    seed: int

    def describe(self) -> str:
        return json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)

    def key(self) -> str:
        return hashlib.sha256(self.describe().encode()).hexdigest()[:20]

    def folder(self, cache_dir: str | Path) -> Path:
        """The folder of the cache's shards."""
        return Path(cache_dir) / f"latents-{self.key()}"

    def single_file(self, cache_dir: str | Path) -> Path:
        """Where an earlier version kept the same latents in one file."""
        return Path(cache_dir) / f"latents-{self.key()}.safetensors"


@torch.no_grad()
def encode(
    vae, source: ImageSource, spec: LatentSpec, batch_size: int, device: torch.device, only: list[range] | None = None,
    progress: bool = True, bar: tqdm | None = None,
) -> torch.Tensor:
    """Images 0..N-1 (or the batches `only`), resized and scaled to [-1, 1] -> one latent_dist sample
    each, in the denoiser's scale (rcgdm/sampling/latent_scaling.py): float32 (N, C, h, w) on the CPU. `bar`: a progress bar to
    advance instead of a new one."""
    dtype = next(vae.parameters()).dtype
    todo = batches(spec.num_data, batch_size) if only is None else only  # a latent's last bits depend on its batch
    chunks = []
    with tqdm(total=sum(map(len, todo)), desc="encoding latents", unit="img", disable=not progress or bar is not None) as own:
        for indices in todo:
            images = load_batch(source, indices, spec.image_size) * 2 - 1
            dist = vae.encode(images.to(device, dtype)).latent_dist
            generators = image_generators(spec.seed, indices)
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            sample = dist.mean.float() + dist.std.float() * noise.to(device)
            chunks.append(for_denoiser(vae, sample).cpu().contiguous())  # the VAE may return channels-last
            (bar or own).update(len(indices))
    return torch.cat(chunks)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def read_single_file(path: Path, description: str, rows: int, row_shape: tuple[int, ...]) -> torch.Tensor | None:
    """An earlier version's one-file cache at `path` if it is intact, holds `rows` latents of `row_shape` and was made
    for `description`; None otherwise."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        latents = load_file(str(path))["latents"]
    except Exception:  # truncated or foreign files fail in many ways
        return None
    intact = meta.get("spec") == description and latents.shape == (rows, *row_shape) and meta.get("sha256") == _sha256(latents)
    return latents if intact else None


def shard_size(per_shard: int, batch_size: int) -> int:
    """Images per shard: `per_shard` rounded up to whole encoding batches, so that a shard's latents are those of
    the one-process run (a latent's last bits depend on its batch)."""
    return -(-per_shard // batch_size) * batch_size


def cached_latents(
    vae, source: ImageSource, spec: LatentSpec, cache_dir: str | Path, batch_size: int, device: torch.device,
    state: PartialState, per_shard: int = 1024,
) -> tuple[ShardedLatents, int]:
    """(the latents of images 0..N-1, read from their shards; how many images were encoded now: 0 on a cache hit).

    Shards of about `per_shard` images that are missing or damaged are encoded, each process its own share of them,
    each shard in the encoding batches of one process: the cache is the same whatever the number of processes."""
    folder, ranges = spec.folder(cache_dir), batches(spec.num_data, shard_size(per_shard, batch_size))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"latent cache {str(folder)!r} is not a folder; expected the cache's folder of shards there "
                        "(remove it)")
    lock = folder.parent / f".{folder.name}.lock"
    with main_only_lock(state, lock, f"the latent cache {folder.name}", wait=True):  # one builder per cache entry
        row_shape = latent_row_shape(vae, spec.image_size)
        todo = _shards_to_encode(spec, cache_dir, ranges, row_shape) if state.is_main_process else None
        todo = broadcast_object_list([todo])[0]
        mine = my_share(todo, state)
        with tqdm(total=sum(map(len, mine)), desc="encoding latents", unit="img",
                  disable=not mine or not state.is_main_process) as bar:
            for rows in mine:
                latents = encode(vae, source, spec, batch_size, device, batches(rows.stop, batch_size, rows.start), bar=bar)
                write_shard(folder, spec.describe(), rows, latents)
        state.wait_for_everyone()  # every shard is written
        if state.is_main_process:  # the shards the other processes wrote (its own it has just hashed as it wrote them)
            _check_written(folder, spec.describe(), [rows for rows in todo if rows not in mine], row_shape)
            if not todo:
                state.print(f"latent cache hit: {folder} ({spec.num_data} images in {len(ranges)} shards, 0 encoded)")
        state.wait_for_everyone()  # and checked, before the main process lets go of its lock
    return ShardedLatents(folder, ranges, row_shape), sum(map(len, todo))


def latent_row_shape(vae, image_size: int) -> tuple[int, int, int]:
    """(C, h, w): the latent of one image_size x image_size image, from the VAE's config."""
    side = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, side, side)


def _shards_to_encode(spec: LatentSpec, cache_dir: str | Path, ranges: list[range], row_shape: tuple[int, ...]) -> list[range]:
    """The shards that are missing or damaged, after an earlier version's one-file cache, if any, is split into
    shards (or, damaged, dropped); each damaged shard and the old file are named in one line."""
    folder, description = spec.folder(cache_dir), spec.describe()
    problems = {rows: shard_problem(folder, description, rows, row_shape) for rows in ranges}
    old = spec.single_file(cache_dir)
    if old.is_file() and not old.is_symlink():
        latents = read_single_file(old, description, spec.num_data, row_shape)
        if latents is None:
            print(f"latent cache {old} (one file, from an earlier version) is unusable: encoding shards afresh")
        else:
            for rows in [rows for rows, problem in problems.items() if problem]:
                write_shard(folder, description, rows, latents[rows.start : rows.stop])
                problems[rows] = None  # written from the old file's checked latents
            print(f"latent cache {old} (one file, from an earlier version) read: split into {len(ranges)} shards in {folder}")
        old.unlink()
    for rows, problem in problems.items():
        if problem and problem != "it is missing":
            print(f"latent shard {shard_path(folder, rows)} is unusable ({problem}): encoding it again")
    return [rows for rows, problem in problems.items() if problem]


def _check_written(folder: Path, description: str, written: list[range], row_shape: tuple[int, ...]) -> None:
    """UserError naming the first shard another process encoded now that cannot be read back here."""
    for rows in written:
        problem = shard_problem(folder, description, rows, row_shape)
        if problem:
            raise UserError(f"latent shard {shard_path(folder, rows)} could not be read back after another process wrote it "
                            f"({problem}); with several machines cache_dir must be on a filesystem they share")
