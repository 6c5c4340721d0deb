"""Command-line plumbing shared by the scripts: one-line user errors, exit code 2."""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: reported as one line, no traceback, exit status 2."""


class InputError(UserError):
    """A bad value of the library input `name` (an argument: `predictor`, `model`, `scheduler`, ...), worded as the
    library's: "predictor 'x.pth' was trained on ...". The scripts name their flags after these arguments, so
    `run_main` reports it as the flag: "--predictor 'x.pth' was trained on ..."."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} {detail}")
        self.name, self.detail = name, detail


class StoppedWhenComplete(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that arrived while a run published its files: the run completed, then stopped (exit 0, so
    that a scheduler does not requeue it and --resume does not look for an interrupted run)."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write the disk (or a quota, or a size limit) refused


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(); turn UserError into `error: ...` on stderr and exit 2. SIGTERM is
    handled like Ctrl-C, so temporary files are cleaned up either way. Under a launcher
    (rcgdm.distributed), processes other than the main one prefix their messages with their rank."""
    signal.signal(signal.SIGTERM, _interrupt)
    rank = os.environ.get("RANK", "0")  # under a launcher, only the main process's message is the plain one
    prefix = f"[process {rank}] " if rank not in ("0", "") else ""
    try:
        main()
    except UserError as err:
        message = f"--{err.name} {err.detail}" if isinstance(err, InputError) else str(err)
        sys.stderr.write(f"{prefix}error: {message}\n")  # one write: processes sharing stderr can't split the line
        sys.exit(2)
    except StoppedWhenComplete:
        sys.stderr.write(f"{prefix}stopped after the run completed (the signal came while its files were published): "
                         "every file is in place\n")
        sys.exit(0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prefix}interrupted: finished files are intact, nothing half-written was kept\n")
        sys.exit(130)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        where = f" writing {err.filename!r}" if err.filename else ""
        sys.stderr.write(f"{prefix}error: {os.strerror(err.errno)}{where}; nothing half-written was kept: free some space, "
                         "or write elsewhere, and run again\n")
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a single line (no usage dump), raised as UserError."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is too small; expected an integer >= 1")
    return value


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's signed 64-bit range, which every script's seeds keep to


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer from 0 to MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected a seed from 0 to {MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; expected a seed from 0 to {MAX_SEED}")
    return value


def non_empty(text: str) -> str:
    """argparse type: a path or name that is not blank (an empty path would silently mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected a path or name")
    return text


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def finite32(value: object) -> bool:
    """Whether `value` is a number (not a bool) that float32, the dtype the numbers here are used in, holds as a finite
    one; an int too large for any float is not (never an OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return abs(float(value)) <= FLOAT32_MAX
    except OverflowError:
        return False


def finite_float(text: str) -> float:
    """argparse type: a float that float32 holds as a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a finite number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; expected a finite number")
    if not finite32(value):
        raise argparse.ArgumentTypeError(f"{text!r} is beyond float32's range; expected a number of magnitude at most "
                                         f"{FLOAT32_MAX:.3g}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; expected a finite number >= 0")
    return value


def text_problem(text: str) -> str | None:
    """Why `text` is not valid text for a prompt (not UTF-8, control characters), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    if any((ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 for c in text):
        return "holds control characters"
    return None


def check_creatable(path: str | Path, what: str = "--out_dir") -> None:
    """UserError unless `path` is a writable directory or could be created as one; creates nothing."""
    full = Path(path).absolute()
    existing = next(p for p in (full, *full.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == full else f"cannot be created (it is under the file {str(existing)!r})"
        raise UserError(f"{what} {str(path)!r} {where}; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable; expected a writable directory")


def writable_dir(path: str | Path, what: str = "--out_dir") -> Path:
    """Create `path` if needed and check it is a writable directory, else UserError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file; expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} {str(path)!r} cannot be created ({err.strerror}); expected a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable; expected a writable directory")
    return path
