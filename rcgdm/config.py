"""nanoGPT-style configuration: plain constants in a script, overridden by `--key=value`."""

from __future__ import annotations

import sys

from rcgdm.cli import UserError, finite32

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _typed(key: str, text: str, default: object) -> object:
    """`text` converted to the type of `default`, or a UserError naming key, value and type."""
    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not finite32(value):  # inf, nan, or beyond float32, the dtype it is used in
                raise ValueError
            return value
    except ValueError:
        expected = {bool: "True or False", int: "an integer", float: "a finite number in float32's range"}[type(default)]
        raise UserError(f"--{key}={text!r} is not {expected}; expected {expected} like the default {default!r}") from None
    return text


def parse_overrides(defaults: dict[str, object], argv: list[str]) -> dict[str, object]:
    """`--key=value` or `--key value` items -> {key: value typed like defaults[key]}; only known keys."""
    overrides: dict[str, object] = {}
    items = list(argv)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or item == "--":
            raise UserError(f"argument {item!r} is not --key=value; valid keys: {', '.join(defaults)}")
        key, eq, text = item[2:].partition("=")
        if key not in defaults:
            raise UserError(f"unknown key {key!r}; valid keys: {', '.join(defaults)}")
        if not eq:
            if not items:
                raise UserError(f"--{key} has no value; expected --{key}=VALUE")
            text = items.pop(0)
        overrides[key] = _typed(key, text, defaults[key])
    return overrides


def describe(config: dict[str, object]) -> str:
    return "\n".join(f"  {key} = {value!r}" for key, value in config.items())


def read(defaults: dict[str, object], argv: list[str], doc: str) -> dict[str, object]:
    """A script's constants (`defaults`) with `argv`'s overrides; `--help` prints `doc` and the defaults, and exits."""
    if argv and argv[0] in ("-h", "--help"):
        print(doc + "\nconfig (defaults):\n" + describe(defaults))
        sys.exit(0)
    return {**defaults, **parse_overrides(defaults, argv)}
