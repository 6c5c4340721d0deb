"""train.py's resume state: everything needed to continue a run as if it had never stopped (net, optimizer, RNG,
history), saved after every epoch and checked in full before a resumed run does any work."""

from __future__ import annotations

from pathlib import Path

import torch

from rcgdm.cli import UserError, finite32
from rcgdm.files.atomic import save_torch
from rcgdm.files.checkpoint import check_finite_state, load_checkpoint

STATE_FORMAT = "rcgdm.train-state/1"


def save_state(path: Path, config: dict, epoch: int, net, optimizer, generator: torch.Generator, history: list) -> None:
    save_torch(
        {
            "format": STATE_FORMAT,
            "config": config,
            "epoch": epoch,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "history": history,
        },
        path,
    )


def load_state(path: Path, config: dict, must_match: tuple[str, ...], net, optimizer, generator: torch.Generator) -> list:
    """Restore `net`, `optimizer` and `generator` from a saved training state (checked in full: `read_state`) whose
    config agrees with `config` on `must_match` -> the history of its epochs."""
    state = read_state(path, net, optimizer, generator, config.get("predictor", "paper"))
    for key in must_match:
        if state["config"].get(key) != config[key]:
            raise UserError(
                f"resume=True: {str(path)!r} was trained with {key}={state['config'].get(key)!r}, not {config[key]!r}; "
                "use the same settings or resume=False"
            )
    return state["history"]


def read_state(path: Path, net, optimizer, generator: torch.Generator, predictor: str = "paper") -> dict:
    """A saved training state, every field checked (types, the kind of net, the net's and optimizer's shapes, finite
    values, the RNG state, one history entry per epoch) and loaded into `net`, `optimizer` and `generator`. `predictor`:
    the kind of net train.py trains (its `predictor`; a state written before there was a choice trained the paper's)."""
    state = load_checkpoint(path, STATE_FORMAT)

    def bad(field: str, detail: str) -> UserError:
        return UserError(f"resume state {str(path)!r}: field {field!r} {detail}; expected an undamaged file as train.py "
                         "writes, or overwrite=True to start again")

    expected = {"config": dict, "epoch": int, "model": dict, "optimizer": dict, "generator": torch.Tensor, "history": list}
    for field, kind in expected.items():
        if not isinstance(state.get(field), kind) or (field == "epoch" and state[field] < 1):
            raise bad(field, f"is not a {kind.__name__}")
    trained = state["config"].get("predictor", "paper")
    if trained != predictor:  # said as such, before its weights are fitted into another net
        raise UserError(f"resume=True: {str(path)!r} was trained with predictor={trained!r}, not {predictor!r}; use the "
                        "same settings or resume=False")
    for field, target in (("model", net), ("optimizer", optimizer)):
        try:
            target.load_state_dict(state[field])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise bad(field, f"does not fit the predictor ({(str(err).splitlines() or [''])[0][:120]})") from None
    check_finite_state(net.state_dict(), path, "resume state")
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if not torch.is_tensor(value) or (name != "step" and value.shape != param.shape) or not torch.isfinite(value).all():
                raise bad("optimizer", f"holds a {name!r} that does not fit its parameter (shape, or NaN/inf)")
    if state["generator"].dtype != torch.uint8 or state["generator"].shape != generator.get_state().shape:
        raise bad("generator", "is not a CPU generator's state")
    generator.set_state(state["generator"])
    for epoch, entry in enumerate(state["history"], start=1):
        if not _history_entry(entry, epoch):
            raise bad("history", f"entry {epoch} is not epoch {epoch}'s finite losses")
    if len(state["history"]) != state["epoch"]:
        raise bad("epoch", f"is {state['epoch']}, but the history holds {len(state['history'])} epochs")
    return state


def _history_entry(entry, epoch: int) -> bool:
    return (isinstance(entry, dict) and entry.get("epoch") == epoch and finite32(entry.get("train_loss"))
            and (entry.get("val_loss") is None or finite32(entry["val_loss"])))
