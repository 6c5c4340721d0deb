"""Several processes through Hugging Face accelerate: each script runs as N copies and splits its work.

    accelerate launch --multi_gpu --num_processes 4 inference.py ...   # 4 GPUs (or 4 CPU processes on a CPU-only machine)
    python3 inference.py ...                                           # one process, as always

The work of a script is cut into the same batches as in one process, and batch k goes to process
k % N: every batch holds the same images, so results match a one-process run. Shared outputs are
written by the main process only; the others hold no locks and write only their own files.
`torchrun` works too: any launcher that sets WORLD_SIZE, RANK and LOCAL_RANK.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import PartialState

from rcgdm.cli import InputError, UserError
from rcgdm.files.locking import locked

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError("device", f"{name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", f"{name!r} asks for CUDA but none is available; expected auto or cpu")
    return device


def launched_processes() -> int:
    """How many processes the launcher started (1 for plain `python3 script.py`)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"environment variable WORLD_SIZE={text!r} is not a process count; expected an integer >= 1 (or unset)")
    return int(text)


def start(device_name: str) -> tuple[PartialState, torch.device]:
    """This process's accelerate state and device. With several processes, auto and cuda give each
    process its own GPU (LOCAL_RANK); cpu runs them on the CPU, over gloo."""
    device = resolve_device(device_name)
    processes = launched_processes()
    if processes == 1:
        _warn_if_cpu_launch_fell_back()
        return PartialState(cpu=device.type == "cpu"), device
    if device.type == "cuda" and device_name not in ("auto", "cuda"):
        raise InputError("device", f"{device_name!r} puts all {processes} processes on one GPU; expected auto or cuda "
                                   "(one GPU per process)")
    state = PartialState(cpu=device.type == "cpu")
    return state, state.device


def finish(state: PartialState) -> None:
    """The end of a script's work: with several processes, each waits for the others and then leaves the process
    group, so that none exits while another still talks to it (gloo then aborts that one: "terminate called without
    an active exception")."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def _warn_if_cpu_launch_fell_back() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process unless MPI is set up; say so."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and "MASTER_ADDR" in os.environ
    if asked:
        print(
            "note: `accelerate launch --cpu` started ONE process (it needs MPI for more); for N CPU processes use "
            "`accelerate launch --multi_gpu --num_processes N SCRIPT --device cpu`",
            file=sys.stderr,
        )


def batches(total: int, size: int, first: int = 0) -> list[range]:
    """Items first..total-1 in runs of `size`: [first, first + size), [first + size, first + 2 size), ... (with first = 0,
    the batches of a one-process run)."""
    return [range(start, min(start + size, total)) for start in range(first, total, size)]


def my_share(units: Sequence[T], state: PartialState, process: int | None = None) -> list[T]:
    """The units a process does (this one, or `process`): every num_processes-th, starting at its index."""
    index = state.process_index if process is None else process
    return list(units[index :: state.num_processes])


def main_only_lock(state: PartialState, lock_file: str | Path, what: str, wait: bool = False):
    """The main process holds the run's lock (see rcgdm.files.locking) for all of them; the others hold none."""
    return locked(lock_file, what, wait) if state.is_main_process else contextlib.nullcontext()

