"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a crash) never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _umask() -> int:
    """This process's umask (mkstemp and mkdtemp ignore it: they give 0600 and 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _umask()
_MODE = 0o666 & ~_UMASK  # what open() would give a new file
_DIR_MODE = 0o777 & ~_UMASK  # what mkdir would give a new folder


LEFTOVER_AGE = 5.0  # seconds: a temporary entry younger than this is never judged a leftover (its owner may be
# between creating it and locking it)


def _prefix(path: Path) -> str:
    return f".{path.name}."


def remove_leftovers(folder: str | Path) -> None:
    """Remove the temporary files and folders that killed processes left in `folder`. Each writer holds a lock on its
    temporary entry while it lives (`_held`): an entry whose lock can be taken has no living owner, on this machine or
    any other sharing the folder, whatever its process ids; a live writer's is left alone."""
    for entry in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        try:
            info = os.lstat(entry)
            if stat.S_ISLNK(info.st_mode) or time.time() - info.st_mtime < LEFTOVER_AGE:
                continue
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its writer lives
        else:
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _held(path: str | Path) -> Iterator[None]:
    """Hold a lock on the temporary file or folder `path` for as long as the block runs: the proof that it is alive."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        with _held(tmp):
            yield Path(tmp)
            os.chmod(tmp, _MODE)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically and byte-reproducibly (saved through a buffer, torch names the
    archive's inner folder after the file, and the temporary name is random)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def save_npy(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_json(obj: Any, path: str | Path) -> None:
    """Strict JSON: NaN and inf are refused (a ValueError), never written as bare NaN."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` (which must not exist); on success rename it onto `path`, else delete
    it: a folder appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)  # an earlier build killed midway
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp"))
    try:
        with _held(tmp):
            yield tmp
            os.chmod(tmp, _DIR_MODE)
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_file(source: str | Path, path: str | Path) -> None:
    """shutil.copyfile, atomically."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
