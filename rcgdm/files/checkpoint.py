"""Loading this project's checkpoints without unpickling."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rcgdm.cli import UserError


def load_checkpoint(path: str | Path, expected_format: str) -> dict:
    """torch.load without unpickling, checking the rcgdm format tag; any problem is a UserError."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"checkpoint {str(path)!r} {what}; expected a file written by this project")
    kind = _other_kind(path)
    if kind is not None:
        raise UserError(f"checkpoint {str(path)!r} is {kind}, not a torch checkpoint; expected a file written by this project")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, hostile pickle ...
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        if first_line.startswith("Weights only load failed"):  # torch's advice would be to unpickle: never
            first_line = "it holds objects other than tensors and plain values, which are never unpickled"
        raise UserError(f"checkpoint {str(path)!r} cannot be loaded safely ({first_line[:200]})") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found != expected_format:
        raise UserError(f"checkpoint {str(path)!r} has format {found!r}; expected {expected_format!r}")
    if not isinstance(checkpoint.get("state_dict", {}), dict):
        raise UserError(f"checkpoint {str(path)!r}: field 'state_dict' holds a {type(checkpoint['state_dict']).__name__}; "
                        "expected a dict of tensors")
    return checkpoint


_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x93NUMPY": "a .npy array",
               b"{": "JSON or text", b"[": "JSON or text"}


def _other_kind(path: Path) -> str | None:
    """What a file that is plainly not a torch checkpoint is (from its first bytes), else None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "empty"
    return next((kind for signature, kind in _SIGNATURES.items() if head.startswith(signature)), None)


def check_finite_state(state_dict: dict, path: str | Path, what: str) -> None:
    """UserError naming the first tensor of `state_dict` that holds NaN or inf."""
    for key, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what} {str(path)!r}: weight {key!r} holds NaN or inf; expected a finite, trained checkpoint")


_PLAIN = (str, int, float, bool, type(None))


def plain_metadata(checkpoint: dict, path: str | Path, skip: tuple[str, ...] = ("state_dict",)) -> dict:
    """A checkpoint's metadata fields (all but `skip`), which must be plain values (str, finite number, bool, None, or
    lists of them): they are recorded in JSON outputs. Anything else is a UserError naming the field."""
    meta = {}
    for key, value in checkpoint.items():
        if key in skip:
            continue
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(isinstance(v, _PLAIN) for v in items):
            raise UserError(f"checkpoint {str(path)!r}: field {key!r} holds a {type(value).__name__}; expected a plain value")
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):  # JSON outputs record it: strict JSON
            raise UserError(f"checkpoint {str(path)!r}: field {key!r} holds NaN or inf; expected a finite number")
        meta[key] = value
    return meta
