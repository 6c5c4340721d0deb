"""Advisory file locks, so two runs never write the same outputs at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from rcgdm.cli import UserError

LOCK_FILE = ".rcgdm.lock"  # an --out_dir's lock (fake_dataset.py, inference.py)


@contextlib.contextmanager
def locked(lock_file: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if needed). If another process holds it:
    wait for it (wait=True) or refuse with a UserError naming `what`."""
    fd = open_lock(lock_file, what)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(f"{what} is in use by another run; wait for it to finish, or use another one") from None
            print(f"waiting for another run to finish with {what} ...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_lock(lock_file: str | Path, what: str) -> int:
    """A descriptor of `lock_file` (created if needed), or a UserError naming it (a folder, say, or unwritable)."""
    try:
        return os.open(lock_file, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise UserError(f"the lock file {str(lock_file)!r} of {what} cannot be opened ({err.strerror}); expected a plain "
                        "file there (remove what is in its place)") from None


def refuse_if_locked(lock_file: str | Path, what: str, message: str | None = None) -> None:
    """UserError (`message`, or one naming `what`) if another process holds `lock_file` now, whoever owns the file;
    creates nothing (a missing file is free). Probed with a shared lock on a read-only descriptor: a run's exclusive
    lock blocks it, and it needs no write permission, so another user's running run is found too."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return  # no lock can be there
    except OSError as err:
        if os.path.islink(lock_file) or os.path.isdir(lock_file):
            return  # not a lock this project made (it never follows a link to one, or locks a folder)
        raise UserError(f"the lock file {str(lock_file)!r} cannot be read ({err.strerror}), so whether a run holds it "
                        "cannot be told; expected a readable lock (or a folder apart from it)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(message or f"{what} is in use by another run; wait for it to finish, or use another one") from None
    finally:
        os.close(fd)
