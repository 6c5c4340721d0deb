"""The latent cache: every image is encoded by the SD VAE once; later runs encode zero images.

A cache file ``latents-<key>.safetensors`` holds float32 latents (N, C, h, w), already multiplied
by the VAE's scaling factor. Its key hashes everything that changes the latents: the VAE's
config and weights, the data source's identity, N, the image size and the seed. The metadata
stores that description and a sha256 of the tensor, checked on every load: a truncated, altered
or mismatched file is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rcgdm.atomic import atomic_path
from rcgdm.data import ImageSource, load_batch
from rcgdm.locking import locked
from rcgdm.runtime import image_seed

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
def encode(vae, source: ImageSource, spec: LatentSpec, batch_size: int, device: torch.device) -> torch.Tensor:
    """Images 0..N-1, resized and scaled to [-1, 1] -> one latent_dist sample each, times the
    scaling factor: float32 (N, C, h, w) on the CPU."""
    dtype = next(vae.parameters()).dtype
    chunks = []
    with tqdm(total=spec.num_data, desc="encoding latents", unit="img") as bar:
        for start in range(0, spec.num_data, batch_size):
            indices = range(start, min(start + batch_size, spec.num_data))
            images = load_batch(source, indices, spec.image_size) * 2 - 1
            dist = vae.encode(images.to(device, dtype)).latent_dist
            generators = [torch.Generator().manual_seed(image_seed(spec.seed, i)) for i in indices]
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            sample = dist.mean.float() + dist.std.float() * noise.to(device)
            chunks.append((sample * vae.config.scaling_factor).cpu().contiguous())  # the VAE may return channels-last
            bar.update(len(indices))
    return torch.cat(chunks)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def read_cache(path: Path, spec: LatentSpec) -> torch.Tensor | None:
    """The cached latents if the file is intact and made for `spec`; None (with the reason printed) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        latents = load_file(str(path))["latents"]
        problem = None
        if meta.get("spec") != spec.describe():
            problem = "it was made for other settings"
        elif latents.shape[0] != spec.num_data or meta.get("sha256") != _sha256(latents):
            problem = "its content does not match its checksum"
    except Exception as err:  # truncated or foreign files fail in many ways
        problem = f"it cannot be read ({type(err).__name__})"
    if problem:
        print(f"latent cache {path} is unusable ({problem}): rebuilding it")
        return None
    return latents


def write_cache(path: Path, spec: LatentSpec, latents: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"spec": spec.describe(), "sha256": _sha256(latents)})


def cached_latents(
    vae, source: ImageSource, spec: LatentSpec, cache_dir: str | Path, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(latents (N, C, h, w) float32 on the CPU, how many images were encoded now: 0 on a cache hit)."""
    path = spec.path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent / f".{path.name}.lock", f"the latent cache {path.name}", wait=True):  # one encoder per cache entry
        latents = read_cache(path, spec)
        if latents is not None:
            print(f"latent cache hit: {path} ({spec.num_data} images, 0 encoded)")
            return latents, 0
        latents = encode(vae, source, spec, batch_size, device)
        write_cache(path, spec, latents)
    return latents, spec.num_data
