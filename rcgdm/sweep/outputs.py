"""The files a sweep writes, checked before anything is created: every folder can be made, no input is an output,
and an earlier run's files are replaced only with --overwrite (or finished with --resume). An overwrite is staged in
a folder whose files replace the earlier run's only once the run completes (rcgdm/files/run_folder.py), and an
earlier run's files are known by its record, so that nothing else in --out_dir is ever removed."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from rcgdm.cli import UserError, check_creatable, writable_dir
from rcgdm.files import run_folder
from rcgdm.files.output_checks import refuse_inputs_as_outputs, refuse_outputs_inside_inputs
from rcgdm.sweep.plan import Combo
from rcgdm.sweep.resume import FILE, RUN, ResumeLog, check_start, progress_files
from rcgdm.sweep.rows import IMAGE_GLOB, is_image_name

# every file the report (rcgdm/report.py) may write (a figure with nothing to draw is not)
REPORT_FILES = ("results.csv", "summary.json", "reward_vs_target.png", "shift_vs_target.png", "reward_vs_compute.png",
                "reward_vs_distance.png", "ess_per_step.png", "grid.png")


def check_outputs(out_dir: Path, combos: list[Combo], inputs: dict[str, str], model_folder: Path | None, resume: bool,
                  overwrite: bool) -> None:
    """UserError unless the run may write its files; `inputs` maps flags to the files the run reads. Creates nothing;
    checked before anything loads, and again under the run's lock."""
    for combo in combos:
        check_creatable(combo.folder)
    refuse_inputs_as_outputs(inputs, [out_dir / name for name in (*REPORT_FILES, FILE)])
    folders = {combo.folder.resolve() for combo in combos}
    for flag, path in inputs.items():
        if Path(path).resolve().parent in folders and fnmatch.fnmatch(Path(path).name, IMAGE_GLOB):
            raise UserError(f"{flag} {path!r} is named like this run's images, in its folder; inputs are never outputs, "
                            "expected another path")
    refuse_outputs_inside_inputs({"--out_dir": out_dir}, {"--model": model_folder})
    refuse_linked_folders(out_dir, combos)
    check_start(out_dir, resume, overwrite)
    earlier = sorted(earlier_files(out_dir, combos), key=lambda name: name != "results.csv")  # named first, if there
    if earlier and not (overwrite or resume):
        raise UserError(f"{str(out_dir / earlier[0])!r} already exists (an earlier run's output); use --overwrite to "
                        "replace it, or another --out_dir")


def refuse_linked_folders(folder: Path, combos: list[Combo]) -> None:
    """UserError if a combination's image folder in `folder` (out_dir or its staging folder) is a symbolic link: its
    images would be written, or a resumed run's unfinished ones removed, outside the run's folder."""
    names = [combo.folder.relative_to(folder).as_posix() for combo in combos if combo.folder != folder]
    run_folder.refuse_links(folder, names, "an image folder of this run")


def earlier_files(out_dir: Path, combos: list[Combo]) -> list[str]:
    """The files of an earlier sweep in out_dir, relative to it: those it recorded, or in a folder from before records,
    the report's files and the images in this run's folders."""
    if not out_dir.is_dir():
        return []
    images = [p.relative_to(out_dir).as_posix() for combo in combos if combo.folder.is_dir()
              for p in sorted(combo.folder.iterdir()) if is_image_name(p.name)]
    return run_folder.earlier_files(out_dir, RUN, [*REPORT_FILES, *images])


def run_dir(out_dir: Path, combos: list[Combo], resume: bool, overwrite: bool) -> Path:
    """Where the run writes: out_dir; or, when it replaces an earlier run's files (overwrite), a staging folder in it
    whose files replace the earlier ones only once the run completes, so a run that fails leaves them as they were;
    resume continues in the staging folder of an interrupted overwrite. A fresh start removes an unfinished one.
    Called by the main process, under the run's lock."""
    staging = run_folder.staging_folder(out_dir, RUN)
    if resume:
        return staging if run_folder.is_staging(staging) and progress_files(staging) else out_dir
    if overwrite and earlier_files(out_dir, combos):
        return run_folder.make_staging(out_dir, RUN)
    run_folder.remove_staging(staging)
    return out_dir


def prepare_folders(folder: Path, combos: list[Combo], log: ResumeLog) -> None:
    """Create every combination's folder in `folder` (out_dir, or its staging folder). When resuming, the images of
    batches that did not finish are removed (they are redone); a fresh start removes an interrupted run's progress
    files."""
    refuse_linked_folders(folder, combos)
    if not log.rows:
        log.remove_files()
    kept = {folder / r["file"] for r in log.rows}
    for combo in combos:
        writable_dir(combo.folder)
        for path in sorted(combo.folder.iterdir()) if log.rows else []:
            if is_image_name(path.name) and path not in kept:
                path.unlink()


def finish(out_dir: Path, folder: Path, combos: list[Combo], written: list[str]) -> None:
    """The run completed in `folder`: publish its files over the earlier run's (staged), or record them (in place)."""
    if folder != out_dir:
        run_folder.publish(out_dir, RUN, written, earlier_files(out_dir, combos))
    else:
        run_folder.record(out_dir, RUN, written)
