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
from pathlib import Path

import torch

from rcgdm.cli import InputError, check_creatable
from rcgdm.files.atomic import atomic_folder
from rcgdm.model_files import cached_snapshot, checked_folder, hub_offline, hub_revision

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
    from rcgdm.tiny.build import build_random_sd

    target = cache_root() / _BUILT_FOLDERS[name]
    if (target / "model_index.json").is_file():
        return target
    try:
        with atomic_folder(target) as staging:
            build_random_sd(staging, name)
    except OSError:
        if not (target / "model_index.json").is_file():  # not a concurrent builder's win
            raise
    return target


def resolve_model(name: str) -> str:
    """`tiny` -> models/tiny-sd (verified); `tiny-random`, `sd15-random` -> their cache folders; an existing
    folder -> itself; anything else is a hub id. Every folder, and a hub repo's files at the commit that later loads
    use, is checked to hold no code before anything reads it (rcgdm/model_files.py)."""
    if not name.strip():
        raise InputError("model", f"{name!r} is empty; expected a hub id, a local diffusers folder, or tiny")
    if name == TINY:
        folder = _verified(TINY_FOLDER)
    elif name in _BUILT_FOLDERS:
        folder = ensure_built(name)
    elif Path(name).is_dir():
        folder = Path(name)
    elif hub_offline():  # the hub's cache holds a snapshot: a folder like any other
        folder = cached_snapshot(name)
    else:
        hub_revision(name)
        return name
    checked_folder(folder.resolve(), name)
    return str(folder)


def local_model_folder(name: str) -> Path | None:
    """The folder model `name` loads from when it is local (nothing is built, verified or downloaded), else None."""
    if name == TINY:
        return TINY_FOLDER
    if name in _BUILT_FOLDERS:
        return cache_root() / _BUILT_FOLDERS[name]
    return Path(name) if name.strip() and Path(name).is_dir() else None


@functools.cache
def _verified(folder: Path) -> Path:
    """`folder` once its sha256 manifest checks out; hashed once per process, not at every config read."""
    from rcgdm.tiny.manifest import verify_manifest

    verify_manifest(folder)
    return folder


def model_fingerprint(name: str) -> str:
    """What a model is, for resume checks: a local folder by its files (path, size, mtime), a hub id by its commit."""
    source = Path(resolve_model(name))
    if not source.is_dir():
        return f"hub:{name}@{hub_revision(name)}"
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder:{digest.hexdigest()[:16]}"


def _from_pretrained(cls, name: str, loader: str = "from_pretrained", **kwargs):
    """cls.from_pretrained (or another `loader` of cls) with a one-line error naming the model when it can't be had."""
    source = resolve_model(name)
    local = Path(source).is_dir()
    where = {"local_files_only": True} if local else {"revision": hub_revision(name)}  # the commit that was checked
    try:
        return getattr(cls, loader)(source, **where, **kwargs)
    except Exception as err:  # offline hub errors, missing files, bad folders ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        hint = "" if local else "; offline, use --model tiny or a local diffusers folder"
        raise InputError("model", f"{name!r} could not be loaded ({reason}){hint}") from None


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

    index = _config(StableDiffusionPipeline, name, "model_index.json")
    found = index.get("_class_name")
    if found != PIPELINE_CLASS:
        raise InputError("model", f"{name!r} is a {found!r}; expected a {PIPELINE_CLASS} (SD 1.x or 2.x)")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue  # settings such as requires_safety_checker, and absent components
        library = spec[0]
        if library not in COMPONENT_LIBRARIES:
            raise InputError("model", f"{name!r}: model_index.json names {component} from {library!r}; "
                            "expected a component of diffusers or transformers (custom code is never run)")  # fmt: skip


def model_facts(name: str) -> dict:
    """What the sampler needs to know before loading weights, from the configs alone: the UNet's latent
    channels and size, the VAE's downsampling factor and the scheduler's prediction type (a refused pipeline
    class fails here)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    check_model_index(name)
    unet = _config(UNet2DConditionModel, name, "unet/config.json")
    scheduler = _config(PNDMScheduler, name, "scheduler/scheduler_config.json")  # any class: config only
    vae = _config(AutoencoderKL, name, "vae/config.json")
    blocks = _field(vae, "block_out_channels", list, name, "vae/config.json", "a list of channel counts")
    kind = _field(scheduler, "prediction_type", str, name, "scheduler/scheduler_config.json", "a string", "epsilon")
    return {
        "in_channels": _field(unet, "in_channels", int, name, "unet/config.json", "an integer"),
        "sample_size": _field(unet, "sample_size", int, name, "unet/config.json", "an integer"),
        "vae_scale_factor": 2 ** (len(blocks) - 1),  # as StableDiffusionPipeline computes it
        "prediction_type": kind,
    }


def _config(cls, name: str, file: str) -> dict:
    """The JSON config `file` (model_index.json, or subfolder/name) of model `name`, which must be an object."""
    subfolder = {"subfolder": file.split("/")[0]} if "/" in file else {}
    config = _from_pretrained(cls, name, loader="load_config", **subfolder)
    if not isinstance(config, dict):
        raise InputError("model", f"{name!r}: {file} holds a {type(config).__name__}; expected a JSON object")
    return config


def _field(config: dict, key: str, kind: type, name: str, file: str, expected: str, default=None):
    value = config.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError("model", f"{name!r}: {file} field {key!r} holds {value!r}; expected {expected}")
    return value


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
