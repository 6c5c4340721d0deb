"""A sha256 manifest for a shipped model folder: written once, checked on every load.

`MANIFEST` (JSON, {relative path: sha256}) lists every file of the folder but itself. A missing,
changed or extra weight file is a one-line error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rcgdm.cli import UserError
from rcgdm.files.atomic import save_json
from rcgdm.files.provenance import sha256_file

MANIFEST = "sha256.json"
UNLISTED = (MANIFEST, "README.md", "training_summary.json")  # the card and summary describe; they do not load


def _listed(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in UNLISTED)


def write_manifest(folder: str | Path) -> Path:
    folder = Path(folder)
    save_json({p.relative_to(folder).as_posix(): sha256_file(p) for p in _listed(folder)}, folder / MANIFEST)
    return folder / MANIFEST


def verify_manifest(folder: str | Path) -> None:
    """UserError naming the first file that is missing, damaged or not listed."""
    folder = Path(folder)
    try:
        expected = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"model folder {str(folder)!r}: {MANIFEST} is missing or unreadable ({type(err).__name__})") from None
    if not isinstance(expected, dict):
        raise UserError(f"model folder {str(folder)!r}: {MANIFEST} is not a {{file: sha256}} object")
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"model file {str(path)!r} is missing; restore it (git checkout -- {folder})")
        if sha256_file(path) != digest:
            raise UserError(f"model file {str(path)!r} is damaged (sha256 differs from {MANIFEST}); restore it "
                            f"(git checkout -- {folder})")
    extra = [p.relative_to(folder).as_posix() for p in _listed(folder) if p.relative_to(folder).as_posix() not in expected]
    if extra:
        raise UserError(f"model folder {str(folder)!r} holds {extra[0]!r}, which {MANIFEST} does not list")
