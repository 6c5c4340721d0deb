"""Where a model comes from: a hub id, a local diffusers folder, `tiny`, or a random-weight build.

`tiny` is the trained tiny model committed under models/tiny-sd (its sha256 manifest is checked on
every load). `tiny-random` (random weights, for plumbing tests), `tiny-sdxl-random`, `tiny-sd3-random`,
`tiny-sd35-random`, `tiny-flux-random` and `tiny-flux-schnell-random` (the same for SDXL, SD3, SD3.5, FLUX.1-dev and
FLUX.1-schnell, rcgdm/tiny/family_builds.py) and `sd15-random` (SD v1.5's architecture with random
weights, ~4 GB, for benchmarks) are built once (offline, seeded) into the cache folder ``$RCGDM_CACHE_DIR``
(default ``~/.cache/rcgdm``). All load through the same `from_pretrained` path as the real models; which
pipeline class loads a model is its family's (rcgdm/sampling/families.py).
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
from rcgdm.sampling.families import DIFFUSION_TYPES, FAMILIES, Family, family_of, refusal

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
TINY_FOLDER = Path(__file__).resolve().parents[1] / "models" / "tiny-sd"
_BUILT_FOLDERS = {"tiny-random": "tiny-random-v4", "sd15-random": "sd15-random-v1", "tiny-sdxl-random": "tiny-sdxl-random-v1",
                  "tiny-sd3-random": "tiny-sd3-random-v1", "tiny-sd35-random": "tiny-sd35-random-v1",
                  "tiny-flux-random": "tiny-flux-random-v1", "tiny-flux-schnell-random": "tiny-flux-schnell-random-v1"}


def cache_root() -> Path:
    """$RCGDM_CACHE_DIR (default ~/.cache/rcgdm): where random-weight models are built; checked before use."""
    root = Path(os.environ.get("RCGDM_CACHE_DIR") or Path.home() / ".cache" / "rcgdm")
    check_creatable(root, "environment variable RCGDM_CACHE_DIR")
    return root


def _builders() -> dict:
    from rcgdm.tiny.build import build_random_sd
    from rcgdm.tiny.family_builds import build_random_flux, build_random_sd3, build_random_sdxl

    return {"tiny-random": lambda out: build_random_sd(out, "tiny-random"),
            "sd15-random": lambda out: build_random_sd(out, "sd15-random"),
            "tiny-sdxl-random": build_random_sdxl,
            "tiny-sd3-random": build_random_sd3,
            "tiny-sd35-random": lambda out: build_random_sd3(out, sd35=True),
            "tiny-flux-random": build_random_flux,
            "tiny-flux-schnell-random": lambda out: build_random_flux(out, schnell=True)}


def ensure_built(name: str = "tiny-random") -> Path:
    """The folder of a locally built random-weight model (one of _BUILT_FOLDERS), built on first use (atomically, so
    concurrent builders are safe)."""
    target = cache_root() / _BUILT_FOLDERS[name]
    if (target / "model_index.json").is_file():
        return target
    try:
        with atomic_folder(target) as staging:
            _builders()[name](staging)
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
    """The folder model `name` loads from when it is local, else None: nothing is built, verified or downloaded (a
    random-weight model's folder is named before its first build; offline, a hub id names its cached snapshot)."""
    if name == TINY:
        return TINY_FOLDER
    if name in _BUILT_FOLDERS:
        return cache_root() / _BUILT_FOLDERS[name]
    if name.strip() and Path(name).is_dir():
        return Path(name)
    if name.strip() and hub_offline():
        try:
            return cached_snapshot(name)
        except InputError:  # not cached: it fails to load later, with the offline hint
            return None
    return None


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




def check_model_index(name: str) -> Family:
    """Read only `model_index.json` and refuse, before anything is imported or loaded, a model whose pipeline class is
    not a supported family's (rcgdm/sampling/families.py); its components were checked with every config of the folder
    (rcgdm/model_files.py). -> the model's family."""
    from diffusers import DiffusionPipeline

    index = _config(DiffusionPipeline, name, "model_index.json")
    family = family_of(index.get("_class_name"))
    if family is None:
        raise InputError("model", f"{name!r} {refusal(index.get('_class_name'))}")
    return family


def model_facts(name: str) -> dict:
    """What the sampler needs to know before loading weights, from the configs alone: the family, the denoiser's
    latent channels, size and patch size, the VAE's downsampling factor and the prediction type (`flow_prediction`
    for flow-matching families; a refused pipeline class fails here)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    family = check_model_index(name)
    denoiser_file = f"{family.denoiser}/config.json"
    denoiser = _config(UNet2DConditionModel, name, denoiser_file)  # any model class: config only
    family = family_of(family.pipeline, denoiser)  # FLUX.1-dev or -schnell, by the guidance embedding
    if family.packed and denoiser.get("_class_name") != "FluxTransformer2DModel":
        raise InputError("model", f"{name!r}: model_index.json says {family.pipeline}, but {denoiser_file} is a "
                                  f"{denoiser.get('_class_name')!r}; expected a FluxTransformer2DModel")
    if family.name == "sdxl" and denoiser.get("addition_embed_type") != "text_time":
        raise InputError("model", f"{name!r}: model_index.json says {family.pipeline}, but {denoiser_file} has no "
                                  "'text_time' added conditioning; expected an SDXL UNet")
    if family.name == "sd" and denoiser.get("addition_embed_type") == "text_time":
        raise InputError("model", f"{name!r}: model_index.json says {family.pipeline}, but {denoiser_file} has SDXL's "
                                  "'text_time' added conditioning; expected an SD 1.x/2.x UNet (or an SDXL label)")
    scheduler = _config(PNDMScheduler, name, "scheduler/scheduler_config.json")  # any class: config only
    vae = _config(AutoencoderKL, name, "vae/config.json")
    blocks = _field(vae, "block_out_channels", list, name, "vae/config.json", "a list of channel counts")
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        raise InputError("model", f"{name!r}: vae/config.json sets latents_mean/latents_std, a per-channel latent "
                                  "normalisation the sampler does not apply; expected scaling (and shift) only")
    configured = None if family.flow else _field(scheduler, "prediction_type", str, name,
                                                 "scheduler/scheduler_config.json", "a string", "epsilon")
    kind = family.prediction_type(configured)
    if not family.flow and kind not in DIFFUSION_TYPES:
        raise InputError("model", f"{name!r} predicts {kind!r}; expected one of {', '.join(DIFFUSION_TYPES)} "
                                  "(see README, model families)")
    in_channels = _field(denoiser, "in_channels", int, name, denoiser_file, "an integer")
    if family.packed and in_channels % 4:
        raise InputError("model", f"{name!r}: {denoiser_file} field 'in_channels' holds {in_channels}; expected a multiple "
                                  "of 4 (2x2 packed latent patches)")
    latent_channels = family.latent_channels(in_channels)
    vae_channels = _field(vae, "latent_channels", int, name, "vae/config.json", "an integer", 4)
    out_channels = denoiser.get("out_channels") or in_channels  # SD3's and FLUX's transformers may leave it to in_channels
    if vae_channels != latent_channels or out_channels != in_channels:
        raise InputError("model", f"{name!r}: vae/config.json makes {vae_channels}-channel latents, and {denoiser_file} "
                                  f"takes {in_channels} and returns {out_channels} channels; expected the denoiser to take "
                                  f"and return the VAE's latents ({vae_channels * (4 if family.packed else 1)} channels)")
    _field(denoiser, "patch_size", int, name, denoiser_file, "an integer", 1)  # checked here; family.patch reads it
    if family.sample_size is None:
        _field(denoiser, "sample_size", int, name, denoiser_file, "an integer")
    return {
        "family": family.name,
        **family.latent_facts(denoiser),
        "vae_scale_factor": 2 ** (len(blocks) - 1),  # as the pipelines compute it
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


def load_pipeline(name: str, dtype: torch.dtype = torch.float32, facts: dict | None = None):
    """The pipeline of `name`'s family (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
    FluxPipeline);
    components the model leaves out (SD's safety checker, SD3's T5) are None; no safety checker (as the paper's code)
    and no watermark (SDXL), so that images are the model's own."""
    import diffusers

    family = FAMILIES[(facts or model_facts(name))["family"]]  # refuses what the configs show cannot be guided
    index = _config(diffusers.DiffusionPipeline, name, "model_index.json")
    absent = {component: None for component, spec in index.items() if spec == [None, None]}
    extra = {
        "sd": {"safety_checker": None, "requires_safety_checker": False},
        "sdxl": {"add_watermarker": False},
    }.get(family.name, {})
    pipe = _from_pretrained(getattr(diffusers, family.pipeline), name, **{**absent, **extra}, **_dtype_kwargs(dtype))
    _float32_vae_if_needed(pipe.vae, family, dtype)
    return pipe


def _float32_vae_if_needed(vae, family: Family, dtype: torch.dtype) -> None:
    """SDXL's VAE overflows in float16: its pipeline upcasts it to decode when the config says force_upcast. Here it
    stays float32 for every encode and decode (its weights rounded to float16 first, as the pipeline's upcast)."""
    if family.float32_vae and dtype == torch.float16 and vae.config.force_upcast:
        vae.to(torch.float32)


def load_vae(name: str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    family = check_model_index(name)
    vae = _from_pretrained(AutoencoderKL, name, subfolder="vae", **_dtype_kwargs(dtype))
    _float32_vae_if_needed(vae, family, dtype)
    return vae


def load_scheduler(name: str):
    """The scheduler train.py noises with: PNDM on the model's betas (alphas_cumprod at training timesteps), or for a
    flow-matching family FlowMatchEuler on the model's shift (sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

    flow = check_model_index(name).flow
    return _from_pretrained(FlowMatchEulerDiscreteScheduler if flow else PNDMScheduler, name, subfolder="scheduler")
