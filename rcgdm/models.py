"""Where Stable Diffusion comes from: a hub id, a local diffusers folder, `tiny`, `tiny-random` or `sd15-random`.

`tiny` is the trained tiny model committed under models/tiny-sd (its sha256 manifest is checked on
every load). `tiny-random` (random weights, for plumbing tests) and `sd15-random` (SD v1.5's
architecture with random weights, ~4 GB, for benchmarks) are built once (offline, seeded) into the
cache folder ``$RCGDM_CACHE_DIR`` (default ``~/.cache/rcgdm``). All load through the same
`from_pretrained` path as SD v1.5.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rcgdm.cli import UserError, check_creatable

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
TINY_FOLDER = Path(__file__).resolve().parents[1] / "models" / "tiny-sd"
_BUILT_FOLDERS = {"tiny-random": "tiny-random-v4", "sd15-random": "sd15-random-v1"}


def cache_root() -> Path:
    """$RCGDM_CACHE_DIR (default ~/.cache/rcgdm): where random-weight models are built; checked before use."""
    root = Path(os.environ.get("RCGDM_CACHE_DIR") or Path.home() / ".cache" / "rcgdm")
    check_creatable(root, "environment variable RCGDM_CACHE_DIR")
    return root


def ensure_built(name: str = "tiny-random") -> Path:
    """The folder of a locally built random-weight model (`tiny-random`, `sd15-random`), built on first use
    (atomically, so concurrent builders are safe)."""
    from rcgdm.tiny import build_random_sd

    target = cache_root() / _BUILT_FOLDERS[name]
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_random_sd(staging / "model", name)
        try:
            os.replace(staging / "model", target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """`tiny` -> models/tiny-sd (verified); `tiny-random`, `sd15-random` -> their cache folders; an existing
    folder -> itself; anything else is a hub id."""
    if name == TINY:
        return str(_verified(TINY_FOLDER))
    if name in _BUILT_FOLDERS:
        return str(ensure_built(name))
    return name


@functools.cache
def _verified(folder: Path) -> Path:
    """`folder` once its sha256 manifest checks out; hashed once per process, not at every config read."""
    from rcgdm.manifest import verify_manifest

    verify_manifest(folder)
    return folder


def model_fingerprint(name: str) -> str:
    """What a model is, for resume checks: a local folder by its files (path, size, mtime), a hub id by itself."""
    source = Path(resolve_model(name))
    if not source.is_dir():
        return name
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder:{digest.hexdigest()[:16]}"


def _from_pretrained(cls, name: str, loader: str = "from_pretrained", **kwargs):
    """cls.from_pretrained (or another `loader` of cls) with a one-line error naming the model when it can't be had."""
    source = resolve_model(name)
    local = Path(source).is_dir()
    try:
        return getattr(cls, loader)(source, local_files_only=local, **kwargs)
    except Exception as err:  # offline hub errors, missing files, bad folders ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        hint = "" if local else "; offline, use --model tiny or a local diffusers folder"
        raise UserError(f"--model {name!r} could not be loaded ({reason}){hint}") from None


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """float32 is what from_pretrained loads anyway; asking only for others keeps older and newer diffusers quiet."""
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


PIPELINE_CLASS = "StableDiffusionPipeline"
COMPONENT_LIBRARIES = ("diffusers", "transformers", "stable_diffusion")  # the last: diffusers' safety checker module


def check_model_index(name: str) -> None:
    """Read only `model_index.json` and refuse, before anything is imported or loaded, a model that is not a
    StableDiffusionPipeline or that names a component outside diffusers and transformers: the folder is data,
    and a library it names would be imported (run) by older diffusers."""
    from diffusers import StableDiffusionPipeline

    index = _from_pretrained(StableDiffusionPipeline, name, loader="load_config")
    found = index.get("_class_name")
    if found != PIPELINE_CLASS:
        raise UserError(f"--model {name!r} is a {found!r}; expected a {PIPELINE_CLASS} (SD 1.x or 2.x)")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue  # settings such as requires_safety_checker, and absent components
        library = spec[0]
        if library not in COMPONENT_LIBRARIES:
            raise UserError(f"--model {name!r}: model_index.json names {component} from {library!r}; "
                            "expected a component of diffusers or transformers (custom code is never run)")  # fmt: skip


def model_facts(name: str) -> dict:
    """What the sampler needs to know before loading weights, from the configs alone: the UNet's latent
    channels and the scheduler's prediction type (a refused pipeline class fails here)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    check_model_index(name)
    unet = _from_pretrained(UNet2DConditionModel, name, loader="load_config", subfolder="unet")
    scheduler = _from_pretrained(PNDMScheduler, name, loader="load_config", subfolder="scheduler")  # any class: config only
    return {"in_channels": unet.get("in_channels"), "prediction_type": scheduler.get("prediction_type", "epsilon")}


def load_pipeline(name: str, dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline for `name`, safety checker off (as the paper's code)."""
    from diffusers import StableDiffusionPipeline

    check_model_index(name)
    no_safety_checker = {"safety_checker": None, "requires_safety_checker": False}
    return _from_pretrained(StableDiffusionPipeline, name, **no_safety_checker, **_dtype_kwargs(dtype))


def check_vae(name: str) -> None:
    """Read the VAE's config only (a one-line UserError when the model cannot be had)."""
    from diffusers import AutoencoderKL

    _from_pretrained(AutoencoderKL, name, loader="load_config", subfolder="vae")


def load_vae(name: str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return _from_pretrained(AutoencoderKL, name, subfolder="vae", **_dtype_kwargs(dtype))


def load_scheduler(name: str):
    from diffusers import PNDMScheduler

    return _from_pretrained(PNDMScheduler, name, subfolder="scheduler")
