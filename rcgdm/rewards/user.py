"""Your own reward, `module:function` or `path/to/file.py:function`, run only when named on the command line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from rcgdm.cli import InputError
from rcgdm.rewards.base import Reward, at_reward_size


def _import_from_cwd(module_name: str):
    """Import `module_name` as `python -c` would (the working folder first; scripts put their own folder
    there), leaving sys.path as it was found."""
    saved = list(sys.path)
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path[:] = saved


class UserFunction(Reward):
    """`module:function` (importable, or a .py path): images (B, 3, 224, 224) in [0, 1] -> rewards (B,) or (B, 1)."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        module_name, _, function_name = spec.rpartition(":")
        try:
            if module_name.endswith(".py"):
                loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
                if loader is None or not Path(module_name).is_file():
                    raise ImportError(f"no file {module_name}")
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
            else:
                module = _import_from_cwd(module_name)
        except Exception as err:  # a user's module can fail to import in any way
            reason = f"{type(err).__name__}: {err}"
            raise InputError("reward", f"{spec!r}: module {module_name!r} cannot be imported ({reason})") from None
        self.function = getattr(module, function_name, None)
        if not callable(self.function):
            raise InputError("reward", f"{spec!r}: {module_name!r} has no function {function_name!r}; expected module:function")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = at_reward_size(images).cpu()
        rewards = torch.as_tensor(np.asarray(self.function(images), dtype=np.float32)).reshape(-1)
        if rewards.shape != (len(images),) or not torch.isfinite(rewards).all():
            raise InputError("reward", f"{self.name!r} returned {tuple(rewards.shape)} values for {len(images)} images, "
                            "or non-finite ones; expected one finite number per image")
        return rewards
