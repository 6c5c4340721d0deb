"""What a run may write: never one of its inputs, never another run's files unless told so.

Each script lists its final output paths up front and calls these checks before it creates
anything: an input that is also an output is refused, and so is an output that already exists
(an earlier run's, or the user's) unless the script's overwrite flag (or resume) says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from rcgdm.cli import UserError
from rcgdm.files.locking import LOCK_FILE, refuse_if_locked


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (existing or not), through links and `..`."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def refuse_inputs_as_outputs(inputs: dict[str, str | Path], outputs: Iterable[Path]) -> None:
    """UserError if an input (flag -> path) is also one of the run's outputs."""
    outputs = list(outputs)
    for flag, path in inputs.items():
        clash = next((out for out in outputs if same_file(path, out)), None)
        if clash is not None:
            raise UserError(f"{flag} {str(path)!r} is also an output of this run ({clash.name}); inputs are never outputs, "
                            "expected another path")


def refuse_existing(outputs: Iterable[Path], how_to_replace: str) -> None:
    """UserError naming the first output that already exists, saying how to replace it."""
    existing = next((path for path in outputs if path.exists()), None)
    if existing is not None:
        raise UserError(f"{str(existing)!r} already exists (an earlier run's output); {how_to_replace}")


def refuse_outputs_inside_inputs(outputs: dict[str, str | Path], inputs: dict[str, str | Path | None]) -> None:
    """UserError if an output (flag -> path) is an input folder (flag -> folder, None when not local; it may not exist
    yet, as a random-weight model before its first build) or inside one: writing there would change the input for
    every later run (a model folder fails its manifest, a data folder gains images)."""
    for out_flag, out in outputs.items():
        out_path = Path(out).resolve()
        for in_flag, folder in inputs.items():
            if folder is not None and (out_path == Path(folder).resolve() or Path(folder).resolve() in out_path.parents):
                raise UserError(f"{out_flag} {str(out)!r} is inside {in_flag} {str(folder)!r}; outputs never go into an "
                                "input, expected a path outside it")


def refuse_nested_runs(out_dir: Path, what: str, below: bool = True) -> None:
    """UserError if a running run (one holding an out_dir's LOCK_FILE) writes into a folder that holds `out_dir`, or
    (`below`) into one inside it, however deep: the runs' files would mix. Its own lock does not count."""
    out_dir = Path(out_dir).resolve()
    ancestors = [folder / LOCK_FILE for folder in out_dir.parents]
    for lock in ancestors + (_locks_below(out_dir) if below else []):
        refuse_if_locked(lock, "", f"{what} {str(out_dir)!r} lies inside or around the folder of a running run "
                                   f"({str(lock.parent)!r}); expected a folder apart from it")


def _locks_below(folder: Path) -> list[Path]:
    """Every LOCK_FILE in the folders below `folder` (links to folders are not followed)."""
    return [Path(root) / LOCK_FILE for root, _, files in os.walk(folder) if Path(root) != folder and LOCK_FILE in files]
