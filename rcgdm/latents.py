"""The latent cache: every image is encoded by the SD VAE once; later runs encode zero images.

A cache file ``latents-<key>.safetensors`` holds float32 latents (N, C, h, w), already in the
denoiser's scale (times the VAE's scaling factor, less its shift factor first for SD3). Its key
hashes everything that changes the latents: the VAE's config and weights, the data source's
identity, N, the image size and the seed. The metadata
stores that description and a sha256 of the tensor, checked on every load: a truncated, altered
or mismatched file is rebuilt, never used.
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rcgdm.cli import UserError
from rcgdm.data import ImageSource, load_batch
from rcgdm.distributed import batches, main_only_lock, my_share
from rcgdm.files.atomic import atomic_path
from rcgdm.latent_scaling import for_denoiser
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

    def path(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / f"latents-{hashlib.sha256(self.describe().encode()).hexdigest()[:20]}.safetensors"


@torch.no_grad()
def encode(
    vae, source: ImageSource, spec: LatentSpec, batch_size: int, device: torch.device, only: list[range] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Images 0..N-1 (or the batches `only`), resized and scaled to [-1, 1] -> one latent_dist sample
    each, in the denoiser's scale (rcgdm/latent_scaling.py): float32 (N, C, h, w) on the CPU."""
    dtype = next(vae.parameters()).dtype
    todo = batches(spec.num_data, batch_size) if only is None else only  # a latent's last bits depend on its batch
    chunks = []
    with tqdm(total=sum(map(len, todo)), desc="encoding latents", unit="img", disable=not progress) as bar:
        for indices in todo:
            images = load_batch(source, indices, spec.image_size) * 2 - 1
            dist = vae.encode(images.to(device, dtype)).latent_dist
            generators = image_generators(spec.seed, indices)
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            sample = dist.mean.float() + dist.std.float() * noise.to(device)
            chunks.append(for_denoiser(vae, sample).cpu().contiguous())  # the VAE may return channels-last
            bar.update(len(indices))
    return torch.cat(chunks)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def read_cache(path: Path, description: str, rows: int) -> torch.Tensor | None:
    """The latents in `path` if the file is intact, holds `rows` latents and was made for `description`;
    None (with the reason printed) otherwise."""
    if not path.is_file() or path.is_symlink():  # a regular file of the cache's own, never a link or a device
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        latents = load_file(str(path))["latents"]
        problem = None
        if meta.get("spec") != description:
            problem = "it was made for other settings"
        elif latents.shape[0] != rows or meta.get("sha256") != _sha256(latents):
            problem = "its content does not match its checksum"
    except Exception as err:  # truncated or foreign files fail in many ways
        problem = f"it cannot be read ({type(err).__name__})"
    if problem:
        print(f"latent cache {path} is unusable ({problem}): rebuilding it")
        return None
    return latents


def write_cache(path: Path, description: str, latents: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"spec": description, "sha256": _sha256(latents)})


def cached_latents(
    vae, source: ImageSource, spec: LatentSpec, cache_dir: str | Path, batch_size: int, device: torch.device,
    state: PartialState,
) -> tuple[torch.Tensor, int]:
    """(latents (N, C, h, w) float32 on the CPU, in every process; how many images were encoded now: 0 on a cache hit).

    With several processes (rcgdm.distributed) each encodes its share of the batches into a part file
    and the main process assembles the parts, each checked like the cache itself: the cache is the
    same file whatever the number of processes, since the batches are those of one process."""
    path = spec.path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():  # any other non-file there (a link, a FIFO) is replaced when written
        raise UserError(f"latent cache {str(path)!r} is a folder; expected the cache's file there (remove the folder)")
    lock = path.parent / f".{path.name}.lock"
    with main_only_lock(state, lock, f"the latent cache {path.name}", wait=True):  # one encoder per cache entry
        latents = read_cache(path, spec.describe(), spec.num_data) if state.is_main_process else None
        hit = broadcast_object_list([latents is not None])[0]
        if hit:
            state.print(f"latent cache hit: {path} ({spec.num_data} images, 0 encoded)")
        elif state.num_processes == 1:
            latents = encode(vae, source, spec, batch_size, device)
            write_cache(path, spec.describe(), latents)
        else:
            latents = _encode_in_parts(vae, source, spec, path, batch_size, device, state)
        state.wait_for_everyone()  # the cache is written
        if not state.is_main_process:
            latents = read_cache(path, spec.describe(), spec.num_data)
        state.wait_for_everyone()  # and read by every process, before the main process lets go of its lock
    if latents is None:
        raise UserError(f"latent cache {path} could not be read back after it was written; check cache_dir's disk")
    return latents, 0 if hit else spec.num_data


def _encode_in_parts(vae, source, spec: LatentSpec, path: Path, batch_size: int, device, state: PartialState):
    """Each process encodes its batches into `<cache>.part<k>of<n>` (an intact part left by a killed
    build is kept); the main process checks and assembles them into the cache and returns the latents."""
    every, world = batches(spec.num_data, batch_size), state.num_processes

    def part(rank: int) -> tuple[Path, str, list[range]]:
        description = f"{spec.describe()} part {rank}/{world}, batches of {batch_size}"
        return path.with_name(f"{path.stem}.part{rank}of{world}.safetensors"), description, my_share(every, state, rank)

    part_path, description, mine = part(state.process_index)
    rows = sum(map(len, mine))
    if mine and read_cache(part_path, description, rows) is None:  # more processes than batches leaves some idle
        write_cache(part_path, description, encode(vae, source, spec, batch_size, device, mine, state.is_main_process))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    latents = None
    for rank in range(world):
        part_path, description, share = part(rank)
        if not share:
            continue
        chunk = read_cache(part_path, description, sum(map(len, share)))
        if chunk is None:
            raise UserError(
                f"process {rank}'s latents {part_path} are missing or unusable; with several machines cache_dir must be on a "
                "filesystem they share; run again to encode them afresh"
            )
        latents = latents if latents is not None else torch.empty((spec.num_data, *chunk.shape[1:]), dtype=chunk.dtype)
        latents[torch.cat([torch.arange(r.start, r.stop) for r in share])] = chunk
    write_cache(path, spec.describe(), latents)
    for stale in path.parent.glob(f"{path.stem}.part*"):
        stale.unlink(missing_ok=True)
    return latents
