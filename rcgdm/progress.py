"""Resumable sweeps: the rows of finished batches, saved atomically after every batch.

`progress.json` in the run folder holds the settings that shape the images and the rows written so
far; `inference.py --resume` skips the finished batches (same seeds and same batches, so a resumed
run writes what an uninterrupted one would) and the file is removed once the run completes.
"""

from __future__ import annotations

import json
from pathlib import Path

from rcgdm.atomic import save_json
from rcgdm.cli import UserError

FILE = "progress.json"


class SweepProgress:
    def __init__(self, path: Path, settings: dict, rows: list[dict]) -> None:
        self.path, self.settings, self.rows = path, settings, rows

    @classmethod
    def open(cls, out_dir: Path, settings: dict, resume: bool, overwrite: bool) -> SweepProgress:
        """Start a run, or with resume=True continue the interrupted one whose settings must match."""
        path = out_dir / FILE
        if not path.exists():
            if resume:
                raise UserError(f"--resume: {str(out_dir)!r} holds no interrupted run ({FILE} is missing)")
            return cls(path, settings, [])
        if not resume:
            if overwrite:
                return cls(path, settings, [])
            raise UserError(f"--out_dir {str(out_dir)!r} holds an interrupted run; use --resume to finish it, or --overwrite")
        try:
            saved = json.loads(path.read_text())
            saved_settings, rows = saved["settings"], saved["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = type(err).__name__
            raise UserError(f"--resume: {str(path)!r} cannot be read ({reason}); use --overwrite to start again") from None
        for key, value in settings.items():
            if key != "seed_used" and saved_settings.get(key) != value:
                raise UserError(
                    f"--resume: the interrupted run used {key}={saved_settings.get(key)!r}, not {value!r}; use the same settings"
                )
        return cls(path, saved_settings, rows)

    @property
    def seed(self) -> int:
        return self.settings["seed_used"]

    def finished(self, combination: tuple, image: int) -> bool:
        """Whether image `image` of (prompt, target, guidance, best_of) is done."""
        wanted = (*combination, image)
        return any((r["prompt"], r["target"], r["guidance"], r["best_of"], r["image"]) == wanted for r in self.rows)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        save_json({"settings": self.settings, "rows": self.rows}, self.path)

    def complete(self) -> None:
        self.path.unlink(missing_ok=True)
