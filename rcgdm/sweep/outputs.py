"""The files a sweep writes, checked before anything is created: every folder can be made, no input is an output,
and an earlier run's files are replaced only with --overwrite (or finished with --resume); an overwrite is staged
in a folder whose files replace the earlier ones only once the run completes."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from rcgdm.cli import UserError, check_creatable, writable_dir
from rcgdm.files.outputs import STAGING, refuse_existing, refuse_inputs_as_outputs, refuse_outputs_inside_inputs, uses_staging
from rcgdm.sweep.plan import Combo
from rcgdm.sweep.resume import ANY_FILE, FILE, ResumeLog, check_start
from rcgdm.sweep.rows import IMAGE_GLOB

RUN_FILES = ("results.csv", "summary.json", "reward_vs_target.png", "shift_vs_target.png", "reward_vs_compute.png", "grid.png")


def check_outputs(out_dir: Path, combos: list[Combo], inputs: dict[str, str], model_folder: Path | None, resume: bool,
                  overwrite: bool) -> None:  # fmt: skip
    """UserError unless the run may write its files; `inputs` maps flags to the files the run reads. Creates nothing."""
    for combo in combos:
        check_creatable(combo.folder)
    outputs = [out_dir / name for name in (*RUN_FILES, FILE)]
    refuse_inputs_as_outputs(inputs, outputs)
    folders = {combo.folder.resolve() for combo in combos}
    for flag, path in inputs.items():
        if Path(path).resolve().parent in folders and fnmatch.fnmatch(Path(path).name, IMAGE_GLOB):
            raise UserError(f"{flag} {path!r} is named like this run's images, in its folder; inputs are never outputs, "
                            "expected another path")  # fmt: skip
    refuse_outputs_inside_inputs({"--out_dir": out_dir}, {"--model": model_folder})
    check_start(out_dir, resume, overwrite)
    if overwrite or resume:
        return
    refuse_existing(outputs[: len(RUN_FILES)], "use --overwrite to replace it, or another --out_dir")
    for combo in combos:
        _refuse_images(combo.folder, sorted(combo.folder.glob(IMAGE_GLOB)) if combo.folder.is_dir() else [])


def _refuse_images(folder: Path, images: list[Path]) -> None:
    if images:
        raise UserError(f"--out_dir {str(folder)!r} already holds {len(images)} images; use --overwrite or another --out_dir")


def run_folder(out_dir: Path, combos: list[Combo], resume: bool, overwrite: bool) -> Path:
    """Where the run writes: out_dir; or, when it replaces an earlier run's outputs (overwrite), a staging folder
    in it whose files replace the earlier ones only once the run completes, so a run that fails leaves them as
    they were; resume continues in the staging folder of an interrupted overwrite."""
    staging = out_dir / STAGING
    replacing = overwrite and not resume and bool(earlier_files(out_dir, combos))
    return staging if uses_staging(staging, resume, any(staging.glob(ANY_FILE)), replacing) else out_dir


def earlier_files(out_dir: Path, combos: list[Combo]) -> list[str]:
    """What an earlier run left where this one writes (run files, progress files, images), relative to out_dir."""
    found = [path for name in RUN_FILES if (path := out_dir / name).exists()] + sorted(out_dir.glob(ANY_FILE))
    found += [path for combo in combos if combo.folder.is_dir() for path in sorted(combo.folder.glob(IMAGE_GLOB))]
    return [path.relative_to(out_dir).as_posix() for path in found]


def prepare_folders(out_dir: Path, combos: list[Combo], overwrite: bool, log: ResumeLog) -> None:
    """Create every folder. Images already there are refused, or cleared with overwrite; when resuming, only the
    images of batches that did not finish are cleared (they are redone). A fresh start also removes an
    interrupted run's progress files."""
    if not log.rows:
        log.remove_files()
    for combo in combos:
        writable_dir(combo.folder)
        existing = sorted(combo.folder.glob(IMAGE_GLOB))
        if log.rows:
            kept = {out_dir / r["file"] for r in log.rows}
            existing = [p for p in existing if p not in kept]
        elif not overwrite:
            _refuse_images(combo.folder, existing)
        for path in existing:
            path.unlink()
