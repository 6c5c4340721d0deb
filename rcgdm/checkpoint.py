"""Loading this project's checkpoints without unpickling."""

from __future__ import annotations

from pathlib import Path

import torch

from rcgdm.cli import UserError


def load_checkpoint(path: str | Path, expected_format: str) -> dict:
    """torch.load without unpickling, checking the rcgdm format tag; any problem is a UserError."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"checkpoint {str(path)!r} {what}; expected a file written by this project")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, hostile pickle, wrong file type ...
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"checkpoint {str(path)!r} cannot be loaded safely ({first_line[:200]})") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found != expected_format:
        raise UserError(f"checkpoint {str(path)!r} has format {found!r}; expected {expected_format!r}")
    return checkpoint


def check_finite_state(state_dict: dict, path: str | Path, what: str) -> None:
    """UserError naming the first tensor of `state_dict` that holds NaN or inf."""
    for key, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what} {str(path)!r}: weight {key!r} holds NaN or inf; expected a finite, trained checkpoint")
