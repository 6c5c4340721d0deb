"""Names confined to a folder physically, not only lexically.

A name read from a file (a publishing plan, a run's record of its files) or declared by a script is used only if it
stays inside its folder on disk: relative, without `..`, and with no component below the folder that is a symbolic
link (a link `lnk -> ../..` planted in a results folder would otherwise carry a remove or a move outside it). Only
regular files are ever removed or replaced. The folder itself may be a link (a user's --out_dir on another disk).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath


class Unconfined(ValueError):
    """A name that is not a relative path inside its folder on disk."""


def inside(root: Path, name: str) -> Path:
    """`root / name`, or Unconfined if `name` is absolute, holds `..` or an empty part, or passes through a symbolic
    link below `root` (the name itself included). Components that do not exist yet are fine: nothing is behind them."""
    parts = PurePosixPath(name).parts if isinstance(name, str) and name else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise Unconfined(f"{name!r} is not a relative name inside the folder")
    path = Path(root)
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break
        if stat.S_ISLNK(mode):
            raise Unconfined(f"{name!r} passes through a symbolic link ({path.relative_to(root).as_posix()})")
    return Path(root, *parts)


def kind(path: Path) -> str | None:
    """None if nothing is at `path` (a link is not followed), "a regular file", or what else is there."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "a special file"


def is_regular_file(path: Path) -> bool:
    """Whether `path` is a regular file itself (a link to one is not)."""
    return kind(path) == "a regular file"


def is_real_folder(path: Path) -> bool:
    """Whether `path` is a folder itself (a link to one is not)."""
    return kind(path) == "a folder"


def identity(folder: Path) -> list[int]:
    """The folder's (device, inode): the same folder after a restart, another one after a copy."""
    info = os.stat(folder)
    return [info.st_dev, info.st_ino]
