"""Resuming a sweep: the rows of finished batches, saved atomically after every batch.

`progress.json` in the run folder holds the settings that shape the images and the rows written so
far; `inference.py --resume` skips the finished batches (same seeds and same batches, so a resumed
run writes what an uninterrupted one would) and the files are removed once the run completes.
Under a launcher (rcgdm/distributed.py) process k > 0 keeps its own `progress.k.json`; a resume reads
them all, so it may use another number of processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rcgdm.cli import UserError
from rcgdm.files.atomic import save_json
from rcgdm.files.run_folder import is_staging, staging_folder
from rcgdm.sweep.rows import image_key, is_valid, unique_rows

RUN = "sweep"  # its record in --out_dir: .sweep.files.json; an overwrite is staged in .sweep.staging
FILE = "progress.json"
_PROGRESS = re.compile(r"progress(\.\d+)?\.json")  # progress.json, or process k's progress.k.json


def progress_files(folder: Path) -> list[Path]:
    """The progress files of a run in `folder` (every process's), never another file whose name starts alike."""
    return sorted(p for p in folder.glob("progress*.json") if _PROGRESS.fullmatch(p.name)) if folder.is_dir() else []


class ResumeLog:
    """The settings of a run and the rows of its finished batches, saved after every batch."""

    def __init__(self, out_dir: Path, settings: dict, rows: list[dict], process: int = 0, auto: dict | None = None) -> None:
        self.path = out_dir / (FILE if process == 0 else f"progress.{process}.json")
        self.settings, self.rows = settings, rows
        self.auto = dict(auto or {})  # the strength --guidance auto chose per (prompt, target): AutoChoice summaries
        self._done = {image_key(row) for row in rows}

    @classmethod
    def open(cls, out_dir: Path, settings: dict, resume: bool, overwrite: bool) -> ResumeLog:
        """Start a run, or with resume=True continue the interrupted one whose settings must match.
        Called by the main process only."""
        check_start(out_dir, resume, overwrite)
        paths = progress_files(out_dir)
        if not resume:
            return cls(out_dir, settings, [])  # an interrupted run's files go once the new run is ready to write (remove_files)
        saved_settings, rows, auto = None, [], {}
        for path in paths:
            saved_settings, saved_rows, saved_auto = _read(path)
            _check_same(saved_settings, settings)
            rows += saved_rows
            auto.update(saved_auto)
        return cls(out_dir, saved_settings, unique_rows(rows), auto=auto)

    @property
    def seed(self) -> int:
        return self.settings["seed_used"]

    def finished(self, combination: tuple, image: int) -> bool:
        """Whether image `image` of (prompt, target, guidance, best_of) is done."""
        return (*combination, image) in self._done

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self._done.update(image_key(row) for row in rows)
        self._save()

    def record_auto(self, key: str, choice: dict) -> None:
        """Keep the strength --guidance auto chose for `key` (`auto_key`): a resumed run uses it, never searches again."""
        self.auto[key] = choice
        self._save()

    def _save(self) -> None:
        save_json({"settings": self.settings, "rows": self.rows, "auto": self.auto}, self.path)

    def remove_files(self) -> None:
        """Remove this run's progress files (every process's): when it completes, or starts afresh."""
        for path in progress_files(self.path.parent):
            path.unlink(missing_ok=True)


def check_start(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """UserError unless a run may start in `out_dir`: --resume needs an interrupted run there, and a fresh
    start over one needs --overwrite. Reads only; checked before anything is created and again under the lock."""
    staging = staging_folder(out_dir, RUN)
    interrupted = bool(progress_files(out_dir) or (is_staging(staging) and progress_files(staging)))
    if resume and not interrupted:
        raise UserError(f"--resume: {str(out_dir)!r} holds no interrupted run ({FILE} is missing)")
    if interrupted and not resume and not overwrite:
        raise UserError(f"--out_dir {str(out_dir)!r} holds an interrupted run; use --resume to finish it, or --overwrite")


def auto_key(prompt: str, target: float) -> str:
    """The key of an auto draw's recorded choice."""
    return json.dumps([prompt, target])


def _read(path: Path) -> tuple[dict, list[dict], dict]:
    from rcgdm.sweep.auto import AutoChoice

    try:
        saved = json.loads(path.read_text())
        settings, rows, auto = saved["settings"], saved["rows"], saved.get("auto", {})
        if not isinstance(settings, dict) or not isinstance(rows, list) or not isinstance(auto, dict):
            raise TypeError
        if not all(is_valid(row) for row in rows):
            raise ValueError  # a row of another shape, or naming a file outside the run folder
        for choice in auto.values():
            AutoChoice.from_summary(choice)
        return settings, rows, auto
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = type(err).__name__
        raise UserError(f"--resume: {str(path)!r} cannot be read ({reason}); use --overwrite to start again") from None


def _check_same(saved: dict, settings: dict) -> None:
    for key, value in settings.items():
        if key.endswith(("_sha256", "_fingerprint")) and saved.get(key) != value:
            what = key.removesuffix("_sha256").removesuffix("_fingerprint")
            raise UserError(f"--resume: --{what} holds other content than in the interrupted run (its file changed); "
                            "expected the same files, or --overwrite to start again")
        if key != "seed_used" and saved.get(key) != value:
            raise UserError(f"--resume: the interrupted run used {key}={saved.get(key)!r}, not {value!r}; use the same settings")
