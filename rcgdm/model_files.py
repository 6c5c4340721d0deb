"""What a model folder (or hub repo) may hold: weights and configs, never code.

A folder is data. Every load path (rcgdm.models.resolve_model) checks it first, at every load (a folder may gain a
file between two loads in one process), whatever the installed versions would do: no code file anywhere in it, no
JSON config at any depth that names code, no component that is itself a pipeline, and every JSON config a regular
file of sane size and depth. A hub repo is checked by its file list and JSON configs at one commit (`hub_revision`),
and every later load asks for that commit. Below diffusers MIN_DIFFUSERS nothing loads: older versions import any
module a model_index.json names.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

from rcgdm.cli import InputError, UserError

# Files whose presence means code could be loaded from the folder: diffusers (0.30 to 0.37 even without
# trust_remote_code) and transformers import Python files a folder carries, and native libraries run on load.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyd", ".pyx", ".so", ".dll", ".dylib")
CODE_KEYS = ("auto_map", "custom_pipeline", "trust_remote_code")  # config keys that name code to fetch and run
MAX_FILES = 10_000
MAX_CONFIG_BYTES = 64 * 2**20  # the largest JSON a model carries is a tokenizer's (T5's: ~2.4 MB)
COMPONENT_LIBRARIES = ("diffusers", "transformers", "stable_diffusion")  # the last: diffusers' safety checker module
INDEX_FILES = ("model_index.json", "modular_model_index.json")  # the configs whose [library, class] pairs diffusers imports
# diffusers 0.38.0 to 0.42.0 import the module a (nested) model_index.json names; 0.42.1 imports only its own libraries
MIN_DIFFUSERS = "0.42.1"


def check_diffusers_version() -> None:
    """UserError if the installed diffusers is older than MIN_DIFFUSERS (requirements.txt's floor)."""
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__) < Version(MIN_DIFFUSERS):
        raise UserError(f"diffusers {diffusers.__version__} is installed; expected diffusers>={MIN_DIFFUSERS} (older "
                        "versions import any module a model's model_index.json names): pip install -r requirements.txt")


def check_file_names(names: list[str], name: str) -> None:
    """UserError if a model's file list (relative paths) holds code."""
    code = next((n for n in names if n.lower().endswith(CODE_SUFFIXES)), None)
    if code is not None:
        raise InputError("model", f"{name!r} holds the code file {code!r}; expected a model of weights and configs only "
                        "(code from a model is never run)")


def check_config(config, file: str, name: str) -> None:
    """UserError if a JSON config names custom code: a key such as auto_map, a `_class_name` that is not a string
    naming one of diffusers' or transformers' own classes, or (in a model_index.json) a [library, class] pair, at any
    depth, outside diffusers and transformers or naming a pipeline (a component that is a pipeline would load its own
    model_index.json, with libraries of its own)."""
    index = Path(file).name in INDEX_FILES
    if index and "/" in file:
        raise InputError("model", f"{name!r}: {file} makes a component a pipeline of its own; expected the components "
                                  "of one pipeline (code from a model is never run)")
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            if index and len(value) >= 2 and isinstance(value[0], str):
                _check_component(value, file, name)
            stack.extend(value)
        if not isinstance(value, dict):
            continue
        key = next((k for k in value if k in CODE_KEYS), None)
        if key is not None:
            raise InputError("model", f"{name!r}: {file} names custom code ({key!r}); expected stock diffusers and "
                            "transformers components (code from a model is never run)")
        cls = value.get("_class_name")
        if "_class_name" in value and not isinstance(cls, str):
            raise InputError("model", f"{name!r}: {file} field '_class_name' holds a {type(cls).__name__}; expected a "
                                      "class name")
        if cls is not None and not index and not _stock_class(cls):
            raise InputError("model", f"{name!r}: {file} names the class {cls!r}, which is not diffusers' or transformers'; "
                            "expected a stock component (code from a model is never run)")
        stack.extend(value.values())


def _check_component(spec: list, file: str, name: str) -> None:
    """A model_index.json [library, class] pair: a library diffusers loads components from, and a stock class that is
    not a pipeline."""
    library, cls = spec[0], spec[1]
    if library not in COMPONENT_LIBRARIES:
        raise InputError("model", f"{name!r}: {file} names a component from {library!r}; expected a component of "
                                  "diffusers or transformers (code from a model is never run)")
    if not isinstance(cls, str) or not _stock_class(cls, library):
        raise InputError("model", f"{name!r}: {file} names the component class {cls!r}, which is not {library}'s; "
                                  "expected a stock component (code from a model is never run)")
    if _is_pipeline(cls):
        raise InputError("model", f"{name!r}: {file} makes the component {cls!r} a pipeline of its own; expected the "
                                  "components of one pipeline (code from a model is never run)")


def _is_pipeline(cls: str) -> bool:
    import diffusers

    found = getattr(diffusers, cls, None)
    return isinstance(found, type) and issubclass(found, diffusers.DiffusionPipeline)


def _stock_class(name: str, library: str | None = None) -> bool:
    """Whether `name` is a class of diffusers or transformers (of `library` alone, when given)."""
    import diffusers
    import transformers
    from diffusers.pipelines import stable_diffusion

    modules = {"diffusers": diffusers, "transformers": transformers, "stable_diffusion": stable_diffusion}
    for module in [modules[library]] if library else [diffusers, transformers]:
        try:
            if isinstance(getattr(module, name), type):
                return True
        except Exception:  # absent, or a lazy import of an optional backend that fails
            continue
    return False


def _model_files(folder: Path, name: str) -> list[str]:
    """Every file under `folder`, through links (a hub cache's snapshot is links), as relative paths."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop
            dirs.clear()
            continue
        seen.add(real)
        files += [(Path(root) / n).relative_to(folder).as_posix() for n in names]
        if len(files) > MAX_FILES:
            raise InputError("model", f"{name!r} holds over {MAX_FILES} files; expected a diffusers model folder")
    return files


def checked_folder(folder: Path, name: str) -> None:
    """The folder holds no code file, and none of its JSON configs names custom code (checked at every call: what was
    checked is what loads, even when the folder changed since an earlier load)."""
    check_diffusers_version()
    files = _model_files(folder, name)
    check_file_names(files, name)
    _check_configs(folder, files, name)


def _check_configs(folder: Path, files: list[str], name: str) -> None:
    for file in files:
        if file.endswith(".json"):
            check_config(_read_json(folder, file, name), file, name)


def _read_json(folder: Path, file: str, name: str):
    """A config's JSON, read only from a regular file (never a FIFO or a device, which would hang or never end) of at
    most MAX_CONFIG_BYTES."""
    try:
        fd = os.open(folder / file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise InputError("model", f"{name!r}: {file} cannot be opened ({err.strerror}); expected a diffusers model "
                                  "folder") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("model", f"{name!r}: {file} is not a regular file; expected a JSON config file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise InputError("model", f"{name!r}: {file} holds {info.st_size} bytes; expected a JSON config of at most "
                                      f"{MAX_CONFIG_BYTES} bytes")
        data = f.read(MAX_CONFIG_BYTES + 1)
    try:
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError("grew while read")
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError("model", f"{name!r}: {file} is not readable JSON ({type(err).__name__}); expected a diffusers "
                        "model folder") from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a repo id
        raise InputError("model", f"{name!r} could not be loaded (not in the hub cache, and HF_HUB_OFFLINE is set); "
                        "offline, use --model tiny or a local diffusers folder") from None


@functools.cache
def hub_revision(name: str) -> str:
    """The commit of hub repo `name` that every later load uses, once its file list and JSON configs are checked
    (`check_file_names`, `check_config`): what is checked is what loads."""
    from huggingface_hub import HfApi, snapshot_download

    check_diffusers_version()
    try:
        info = HfApi().model_info(name)
        check_file_names([s.rfilename for s in info.siblings or []], name)
        configs = Path(snapshot_download(name, revision=info.sha, allow_patterns=["*.json"]))
    except UserError:
        raise
    except Exception as err:  # offline, no such repo, a malformed id ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError("model", f"{name!r} could not be loaded ({reason}); offline, use --model tiny or a local "
                        "diffusers folder") from None
    _check_configs(configs, _model_files(configs, name), name)
    return info.sha
