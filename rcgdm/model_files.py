"""What a model folder (or hub repo) may hold: weights and configs, never code.

A folder is data. Every load path (rcgdm.models.resolve_model) checks it first, whatever the installed
versions would do: no code file anywhere in it, no JSON config that names code. A hub repo is checked by its
file list and JSON configs at one commit (`hub_revision`), and every later load asks for that commit.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from rcgdm.cli import InputError, UserError

# Files whose presence means code could be loaded from the folder: diffusers (0.30 to 0.37 even without
# trust_remote_code) and transformers import Python files a folder carries, and native libraries run on load.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyd", ".pyx", ".so", ".dll", ".dylib")
CODE_KEYS = ("auto_map", "custom_pipeline", "trust_remote_code")  # config keys that name code to fetch and run
MAX_FILES = 10_000


def check_file_names(names: list[str], name: str) -> None:
    """UserError if a model's file list (relative paths) holds code."""
    code = next((n for n in names if n.lower().endswith(CODE_SUFFIXES)), None)
    if code is not None:
        raise InputError("model", f"{name!r} holds the code file {code!r}; expected a model of weights and configs only "
                        "(code from a model is never run)")  # fmt: skip


def check_config(config, file: str, name: str) -> None:
    """UserError if a JSON config names custom code: a key such as auto_map, or a `_class_name` that is not
    one of diffusers' or transformers' own classes (model_index.json's components are checked apart)."""
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        if not isinstance(value, dict):
            continue
        key = next((k for k in value if k in CODE_KEYS), None)
        if key is not None:
            raise InputError("model", f"{name!r}: {file} names custom code ({key!r}); expected stock diffusers and "
                            "transformers components (code from a model is never run)")  # fmt: skip
        cls = value.get("_class_name")
        if isinstance(cls, str) and file != "model_index.json" and not _stock_class(cls):
            raise InputError("model", f"{name!r}: {file} names the class {cls!r}, which is not diffusers' or transformers'; "
                            "expected a stock component (code from a model is never run)")  # fmt: skip
        stack.extend(value.values())


def _stock_class(name: str) -> bool:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        try:
            if isinstance(getattr(library, name), type):
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


@functools.cache
def checked_folder(folder: Path, name: str) -> None:
    """The folder holds no code file, and none of its JSON configs names custom code (checked once per process)."""
    files = _model_files(folder, name)
    check_file_names(files, name)
    _check_configs(folder, files, name)


def _check_configs(folder: Path, files: list[str], name: str) -> None:
    for file in files:
        if file.endswith(".json"):
            check_config(_read_json(folder, file, name), file, name)


def _read_json(folder: Path, file: str, name: str):
    try:
        return json.loads((folder / file).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError("model", f"{name!r}: {file} is not readable JSON ({type(err).__name__}); expected a diffusers "
                        "model folder") from None  # fmt: skip


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a repo id
        raise InputError("model", f"{name!r} could not be loaded (not in the hub cache, and HF_HUB_OFFLINE is set); "
                        "offline, use --model tiny or a local diffusers folder") from None  # fmt: skip


@functools.cache
def hub_revision(name: str) -> str:
    """The commit of hub repo `name` that every later load uses, once its file list and JSON configs are checked
    (`check_file_names`, `check_config`): what is checked is what loads."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(name)
        check_file_names([s.rfilename for s in info.siblings or []], name)
        configs = Path(snapshot_download(name, revision=info.sha, allow_patterns=["*.json"]))
    except UserError:
        raise
    except Exception as err:  # offline, no such repo, a malformed id ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError("model", f"{name!r} could not be loaded ({reason}); offline, use --model tiny or a local "
                        "diffusers folder") from None  # fmt: skip
    _check_configs(configs, _model_files(configs, name), name)
    return info.sha
