"""A run's files in the folder it writes to: recorded, staged, and published whole.

- **Recorded.** A completed run records the files it wrote, relative to its folder, in `.{run}.files.json` (`run`:
  the script's name for it: `sweep`, `fake_dataset`, `simulation`, or `convnet.train` for a predictor convnet.pth).
  Only recorded files are ever removed: a user's notes in the folder survive every overwrite. A folder from before
  these records counts the script's declared names as the earlier run's.
- **Staged.** A run that replaces an earlier one writes into its staging folder, `.{run}.staging` (holding MARKER, so
  that only a folder this project made is ever removed whole), and leaves the earlier files alone until it completes.
- **Published whole.** `publish` first writes its plan (files to move in, the earlier run's files that the new run
  did not write, to remove) to `.{run}.publish.json`, then carries it out with Ctrl-C and SIGTERM held back. A
  publish cut short anyway (SIGKILL, a power cut) is finished by the next run that opens the folder (`recover`),
  so the folder holds the earlier run or the new one, never a mix. A plan is trusted only in the folder it was
  written for (its device and inode), and only if every file it moves is staged or already in place.
- **Confined.** Every name, read from a record or a plan or declared by the script, is used only if it stays inside
  the folder on disk (no symbolic link on its way: rcgdm/files/confined.py) and names a regular file or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from rcgdm.cli import StoppedWhenComplete, UserError
from rcgdm.files import confined
from rcgdm.files.atomic import save_json
from rcgdm.files.locking import LOCK_FILE, locked, refuse_if_locked
from rcgdm.files.output_checks import refuse_nested_runs

MARKER = ".rcgdm-staging"


def records(root: Path, run: str) -> Path:
    return root / f".{run}.files.json"


def journal(root: Path, run: str) -> Path:
    return root / f".{run}.publish.json"


def staging_folder(root: Path, run: str) -> Path:
    """Where run `run` stages an overwrite: a name of the script's own, never one read from a file."""
    return root / f".{run}.staging"


def _relative_names(value: object) -> list[str]:
    """ValueError unless `value` is a list of relative paths (checked on disk by `_inside` where they are used)."""
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise ValueError("not a list of file names")
    for name in value:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{name!r} lies outside the folder")
    return value


def _read(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{what} {str(path)!r} cannot be read ({type(err).__name__}); expected the file this project "
                        "wrote (remove it if it is not)") from None


def _inside(root: Path, name: str, source: str, regular: bool = True) -> Path:
    """`root / name` if it stays inside `root` on disk and (`regular`) holds a regular file or nothing; else a
    UserError naming `source`, where the name came from."""
    try:
        path = confined.inside(root, name)
    except confined.Unconfined as err:
        raise UserError(f"{source} in {str(root)!r}: {err}; files outside a run's folder are never touched, expected "
                        "real files and folders inside it (remove the link)") from None
    found = confined.kind(path)
    if regular and found not in (None, "a regular file"):
        raise UserError(f"{str(path)!r} ({source}) is {found}, not a regular file; only regular files are replaced or "
                        "removed, expected it gone (move it away)")
    return path


def refuse_links(root: Path, names: Iterable[str], source: str) -> None:
    """UserError if one of `names` (files or folders a run writes in `root`) passes through a symbolic link."""
    for name in names:
        _inside(root, name, source, regular=False)


def recorded_files(root: Path, run: str) -> list[str] | None:
    """The files the last completed run `run` recorded in `root`, or None when it recorded none."""
    path = records(root, run)
    if not confined.is_regular_file(path):
        return None
    try:
        return _relative_names(_read(path, "the record of files"))
    except ValueError as err:
        raise UserError(f"the record of files {str(path)!r} is damaged ({err}); expected the file this project wrote "
                        "(remove it if it is not)") from None


def earlier_files(root: Path, run: str, declared: Iterable[str]) -> list[str]:
    """The files an earlier run `run` left in `root` that still exist: its record, or else (a folder from before
    records) those of the `declared` names that exist. UserError if one of them, or of the `declared` names the new
    run writes, passes through a symbolic link or is not a regular file."""
    declared = list(declared)
    for name in declared:
        _inside(root, name, "an output of this run")
    names = recorded_files(root, run)
    if names is not None:
        source = f"a name in the record of files {records(root, run).name}"
        return [name for name in dict.fromkeys(names) if confined.kind(_inside(root, name, source))]
    return [name for name in dict.fromkeys(declared) if confined.kind(root / name)]


def check_out_dir(out_dir: Path, run: str, declared: Iterable[str], what: str, overwrite: bool,
                  holding_lock: bool = False) -> None:
    """UserError unless run `run` may write into `out_dir`: no run holds it (its LOCK_FILE) or a folder around or inside
    it, and an earlier run's files are replaced only with --overwrite. A publish cut short by a kill is finished first."""
    if not holding_lock:
        refuse_if_locked(out_dir / LOCK_FILE, what)
        recover(out_dir, run, out_dir / LOCK_FILE, what)
    refuse_nested_runs(out_dir, "--out_dir")
    earlier = earlier_files(out_dir, run, declared)
    if earlier and not overwrite:
        raise UserError(f"{str(out_dir / earlier[0])!r} already exists (an earlier run's output); use --overwrite to "
                        "replace it, or another --out_dir")


def record(root: Path, run: str, written: Iterable[str]) -> None:
    """Record the files run `run` wrote in `root` (relative names)."""
    save_json(sorted(set(written)), records(root, run))


def make_staging(root: Path, run: str) -> Path:
    """A fresh staging folder for run `run` in `root` (an earlier one of this project's is replaced); UserError if
    something else is there."""
    staging = staging_folder(root, run)
    remove_staging(staging)
    if confined.kind(staging) is not None:
        raise UserError(f"{str(staging)!r} exists and is not a staging folder of this project; expected it gone "
                        "(move it away)")
    staging.mkdir(parents=True)
    (staging / MARKER).touch()
    return staging


def is_staging(folder: Path) -> bool:
    """Whether `folder` is a real folder (not a link) holding MARKER as a regular file: one this project made."""
    return confined.is_real_folder(folder) and confined.is_regular_file(folder / MARKER)


def remove_staging(staging: Path) -> None:
    """Remove `staging` if this project made it (it holds MARKER); anything else at that path is left alone."""
    if is_staging(staging):
        shutil.rmtree(staging)


@contextlib.contextmanager
def signals_held(completes_run: bool = False) -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then act as they would have (from the main thread, where Python
    runs signal handlers: a handler is swapped, since blocking the signal in one thread of a threaded process does not
    stop another thread from taking it). A block that `completes_run` ends it as what happened: StoppedWhenComplete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received, completed = [], False
    previous = {number: signal.signal(number, lambda n, _: received.append(n)) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        completed = True
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            handler = previous[received[0]]
            if completes_run and completed and handler != signal.SIG_IGN:
                raise StoppedWhenComplete
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def publish(root: Path, run: str, written: Iterable[str], earlier: Iterable[str]) -> None:
    """Move the completed run's files (`written`, relative names) from its staging folder into `root`, remove the
    `earlier` run's files that the new one did not write, record `written`, and remove the staging folder: as one step
    (module docstring). Until this is called an overwriting run leaves the earlier files as they were."""
    written = list(dict.fromkeys(written))
    plan = {"folder": confined.identity(root), "written": written,
            "remove": [name for name in dict.fromkeys(earlier) if name not in set(written)]}
    with signals_held(completes_run=True):
        save_json(plan, journal(root, run))
        _carry_out(root, run, plan)


def recover(root: Path, run: str, lock_file: Path, what: str) -> None:
    """Finish a publish that was cut short in `root` (its plan is still there), holding the folder's lock."""
    if not confined.kind(journal(root, run)):
        return
    with locked(lock_file, what), signals_held():
        if confined.kind(journal(root, run)):  # not finished by another run meanwhile
            _carry_out(root, run, _read_plan(root, run))
            print(f"finished publishing an interrupted run's files in {root}")


def _read_plan(root: Path, run: str) -> dict:
    """The plan of a publish cut short in `root`: UserError unless it is one this project wrote for this folder."""
    path = journal(root, run)
    if not confined.is_regular_file(path):
        raise UserError(f"the publishing plan {str(path)!r} is {confined.kind(path)}, not a regular file; expected the "
                        "file this project wrote (remove it)")
    plan = _read(path, "the publishing plan")
    try:
        if not isinstance(plan, dict) or set(plan) != {"folder", "written", "remove"}:
            raise ValueError("not a plan of this version")
        _relative_names(plan["written"])
        _relative_names(plan["remove"])
    except ValueError as err:
        raise UserError(f"the publishing plan {str(path)!r} is damaged ({err}); expected the file this project wrote "
                        "(remove it if it is not)") from None
    if plan["folder"] != confined.identity(root):
        raise UserError(f"the publishing plan {str(path)!r} was written for another folder (this one is a copy, or it "
                        "was put here); a plan is trusted only where it was written: remove it, and its staging folder "
                        f"{staging_folder(root, run).name!r}, to keep the folder as it is")
    return plan


def _carry_out(root: Path, run: str, plan: dict) -> None:
    """Carry out a publishing plan, once every name in it is checked: each written file is in the staging folder or
    already in place, and every name stays inside its folder on disk and names a regular file or nothing. Run again
    after an interruption, it finishes what is left (moved files are no longer staged, removed ones no longer there)."""
    staging = staging_folder(root, run)
    staged = is_staging(staging)
    source = f"a name in the publishing plan {journal(root, run).name}"
    moves = []
    for name in plan["written"]:
        final = _inside(root, name, source)
        new = _inside(staging, name, source) if staged else None
        if new is not None and confined.is_regular_file(new):
            moves.append((new, final))
        elif not confined.is_regular_file(final):
            raise UserError(f"the publishing plan {str(journal(root, run))!r} names {name!r}, which is neither in its "
                            f"staging folder {staging.name!r} nor in place; expected the plan this project wrote (remove it "
                            "if it is not)")
    removed = [_inside(root, name, source) for name in plan["remove"]]
    for new, final in moves:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, final)
    for path in removed:
        path.unlink(missing_ok=True)
        _remove_empty_parents(path, root)
    record(root, run, plan["written"])
    journal(root, run).unlink()
    remove_staging(staging)


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Folders that held only the removed files of an earlier run (its image folders) go too."""
    for folder in path.parents:
        if folder == root or root not in folder.parents:
            return
        with contextlib.suppress(OSError):  # not empty: a folder of the new run's, or holding a user's file
            folder.rmdir()
