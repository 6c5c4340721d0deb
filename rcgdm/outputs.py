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
