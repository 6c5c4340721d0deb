"""The files a training run (train.py) writes: out_path, and beside it side files named from out_path without its
suffix (convnet.pth -> convnet.best.pth, convnet.resume.pth, convnet.metrics.jsonl, convnet.loss_curve.png,
convnet.loss_by_noise.png, convnet.train_summary.json). Runs whose out_paths share that name (a.pth, a.pt) would share
side files: one lock (`.a.lock`) and one record (`.a.train.files.json`) serve them both, so they never run together.
An overwrite is staged in `.a.train.staging/` and published once the run completes (rcgdm/files/run_folder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from rcgdm.cli import UserError, check_creatable
from rcgdm.files import run_folder
from rcgdm.files.output_checks import refuse_inputs_as_outputs, refuse_outputs_inside_inputs
from rcgdm.models import local_model_folder

SIDE_FILES = ("best.pth", "resume.pth", "metrics.jsonl", "loss_curve.png", "loss_by_noise.png", "train_summary.json")


def named_files(out_path: Path) -> dict[str, Path]:
    """Every file a run writes, by role: "predictor" (out_path), "best", "resume", "metrics", ..."""
    return {"predictor": out_path, **{name.split(".")[0]: out_path.with_suffix(f".{name}") for name in SIDE_FILES}}


@dataclass(frozen=True)
class PredictorFiles:
    """A training run's files: where they go (`final`), where an overwrite stages them (`staged`), its lock and record."""

    out_path: Path

    @property
    def folder(self) -> Path:
        return self.out_path.parent

    @property
    def final(self) -> dict[str, Path]:
        return named_files(self.out_path)

    @property
    def staged(self) -> dict[str, Path]:
        return named_files(run_folder.staging_folder(self.folder, self.run) / self.out_path.name)

    @property
    def side_name(self) -> str:
        return self.out_path.with_suffix("").name

    @property
    def run(self) -> str:
        return f"{self.side_name}.train"

    @property
    def lock(self) -> Path:
        return self.folder / f".{self.side_name}.lock"

    def earlier(self) -> list[str]:
        """An earlier run's files beside out_path (names): its record, or those of this run's names that exist."""
        return run_folder.earlier_files(self.folder, self.run, [path.name for path in self.final.values()])

    def check(self, config: SimpleNamespace) -> None:
        """Before anything is created (and again under the lock): out_path is a file path, no input is an output or
        holds one, and no earlier run's files are replaced unless resume=True (an interrupted run, staged for an
        interrupted overwrite) or overwrite=True."""
        final, staged = self.final, self.staged
        side = next((side for side in SIDE_FILES if self.out_path.name.endswith(f".{side}")), None)
        if side is not None:  # a.best.pth: run a.pth writes it too, under another lock
            raise UserError(f"out_path {str(self.out_path)!r} is named like a side file of another run's predictor "
                            f"(the .{side} of {self.out_path.name.removesuffix('.' + side)}.pth); expected a name that "
                            f"does not end in .{side}")
        if self.out_path.is_dir():
            raise UserError(f"out_path {str(self.out_path)!r} is a directory; expected a file path like convnet.pth")
        check_creatable(self.folder, "out_path's folder")
        check_creatable(config.cache_dir, "cache_dir")
        refuse_inputs_as_outputs({"labels_path": config.labels_path}, final.values())
        if Path(config.cache_dir).resolve() in self.out_path.resolve().parents:
            raise UserError(f"out_path {str(self.out_path)!r} is inside cache_dir {config.cache_dir!r}; expected a path "
                            "outside the cache")
        data_folder = config.data if Path(config.data).is_dir() else None
        refuse_outputs_inside_inputs({"out_path": self.out_path, "cache_dir": config.cache_dir},
                                     {"model": local_model_folder(config.model), "data": data_folder})
        earlier = self.earlier()  # also refuses a name through a link, whatever the flags
        if config.resume:
            if not (final["resume"].is_file() or staged["resume"].is_file()):
                raise UserError(f"resume=True but {str(final['resume'])!r} does not exist; expected a run to continue")
        elif not config.overwrite:
            # an unfinished replacement, or a run that stopped before out_path (a finished one keeps its resume state)
            unfinished = [staged["resume"]] if staged["resume"].exists() else []
            unfinished += [final["resume"]] if final["resume"].exists() and not self.out_path.exists() else []
            if unfinished:
                raise UserError(f"{str(unfinished[0])!r} holds an interrupted run; resume=True to finish it, or "
                                "overwrite=True to start again")
            if earlier:
                raise UserError(f"{str(self.folder / earlier[0])!r} already exists (an earlier run's output); "
                                "overwrite=True to replace it, or another out_path")

    def where_to_write(self, config: SimpleNamespace, main: bool) -> dict[str, Path]:
        """`final`; or `staged`, when the run replaces an earlier one or resumes an interrupted replacement. A fresh
        start removes an unfinished replacement's staging folder (the main process does)."""
        staged = self.staged
        staging = staged["predictor"].parent
        if config.resume:
            return staged if run_folder.is_staging(staging) and staged["resume"].is_file() else self.final
        replacing = config.overwrite and bool(self.earlier())
        if main and replacing:
            run_folder.make_staging(self.folder, self.run)
        elif main:
            run_folder.remove_staging(staging)
        return staged if replacing else self.final

    def finish(self, writes: dict[str, Path]) -> None:
        """The run completed: publish its files over the earlier run's (staged), or record them (in place)."""
        written = [path.name for path in writes.values() if path.is_file()]
        if writes["predictor"] != self.out_path:
            run_folder.publish(self.folder, self.run, written, self.earlier())
        else:
            run_folder.record(self.folder, self.run, written)
        shown = [self.final[k] for k in ("predictor", "metrics", "loss_curve", "loss_by_noise", "train_summary")]
        print(f"wrote {', '.join(str(path) for path in shown if path.exists())}")
