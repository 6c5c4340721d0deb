"""What a run may write: never one of its inputs, never another run's files unless told so.

Each script lists its final output paths up front and calls these checks before it creates
anything: an input that is also an output is refused, and so is an output that already exists
(an earlier run's, or the user's) unless the script's overwrite flag (or resume) says otherwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from rcgdm.cli import UserError


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
                            "expected another path")  # fmt: skip


def refuse_existing(outputs: Iterable[Path], how_to_replace: str) -> None:
    """UserError naming the first output that already exists, saying how to replace it."""
    existing = next((path for path in outputs if path.exists()), None)
    if existing is not None:
        raise UserError(f"{str(existing)!r} already exists (an earlier run's output); {how_to_replace}")


def refuse_outputs_inside_inputs(outputs: dict[str, str | Path], inputs: dict[str, str | Path | None]) -> None:
    """UserError if an output (flag -> path) is an input folder (flag -> folder, None when not local) or inside one:
    writing there would change the input for every later run (a model folder fails its manifest, a data folder
    gains images)."""
    for out_flag, out in outputs.items():
        out_path = Path(out).resolve()
        for in_flag, folder in inputs.items():
            if folder is not None and Path(folder).is_dir() and (out_path == Path(folder).resolve() or
                                                                 Path(folder).resolve() in out_path.parents):  # fmt: skip
                raise UserError(f"{out_flag} {str(out)!r} is inside {in_flag} {str(folder)!r}; outputs never go into an "
                                "input, expected a path outside it")  # fmt: skip


STAGING = ".overwrite"  # an overwriting run's files wait here until the run completes


def uses_staging(staging: Path, resume: bool, unfinished_there: bool, replacing: bool, main: bool = True) -> bool:
    """Whether a run writes into `staging` rather than in place: when it replaces an earlier run's outputs
    (`replacing`), so that a run that fails leaves them as they were (`publish` moves its files over them once it
    completes), or when it resumes an unfinished replacement (`unfinished_there`). Otherwise a leftover staging
    folder is an unfinished replacement this run supersedes. The main process clears and makes the folder."""
    if resume:
        return unfinished_there
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        if replacing:
            staging.mkdir()
    return replacing


def publish(staging: Path, target: Path, names: Iterable[str]) -> None:
    """Move a completed run's files from `staging` onto `target` (`names` relative to both), replacing the earlier
    run's; a name `staging` lacks is removed from `target` (an earlier run's file this run did not make). Then
    `staging` goes. Until this is called an overwriting run leaves the earlier files as they were."""
    for name in dict.fromkeys(names):  # once each: a second pass would remove what the first moved in
        new, old = staging / name, target / name
        if new.exists():
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(new, old)
        else:
            old.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
