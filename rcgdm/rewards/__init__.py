"""Ground-truth rewards, one module each; this file picks one by name and rebuilds one from a file.

    base.py             what a reward is: images (B, 3, H, W) in [0, 1] -> (B,), judged at 224x224
    resnet18.py         ``resnet18-random``, the paper's: ResNet18 with a random Linear(512, 1) head
    compressibility.py  ``compressibility``: minus the JPEG size in kB at quality 95, as in DDPO (offline)
    aesthetic.py        ``aesthetic``: the LAION aesthetic predictor on CLIP ViT-L/14 (from the hub)
    user.py             ``module:function`` or ``path/to/file.py:function``: your own function

`reward_model.pth` records which one (and its weights where it has any); `load_reward` rebuilds it
without running any code the file names.
"""

from __future__ import annotations

from pathlib import Path

from rcgdm.cli import InputError, UserError
from rcgdm.files.checkpoint import load_checkpoint, plain_metadata
from rcgdm.rewards import resnet18
from rcgdm.rewards.aesthetic import Aesthetic
from rcgdm.rewards.base import FORMAT, SIZE, Reward, at_reward_size
from rcgdm.rewards.compressibility import Compressibility
from rcgdm.rewards.resnet18 import ResNetReward
from rcgdm.rewards.user import UserFunction

BUILT_IN = ("resnet18-random", "compressibility", "aesthetic")
__all__ = ["BUILT_IN", "FORMAT", "SIZE", "Reward", "at_reward_size", "build_reward", "load_reward"]


def build_reward(name: str, weights: str = "imagenet", seed: int = 0) -> Reward:
    """A reward by name (fake_dataset.py --reward); `weights` and `seed` shape resnet18-random only."""
    if name == "resnet18-random":
        return ResNetReward(resnet18.build_reward_model(weights, seed), weights, seed)
    if name == "compressibility":
        return Compressibility()
    if name == "aesthetic":
        return Aesthetic()
    if ":" in name:
        return UserFunction(name)
    raise InputError("reward", f"{name!r} is unknown; expected one of {', '.join(BUILT_IN)} or module:function")


def load_reward(path: str | Path, user_reward: str | None = None) -> tuple[Reward, dict]:
    """Rebuild the reward that reward_model.pth was written for -> (reward, metadata).

    The file is data: the reward name it records is compared with names, never imported. A
    user-code reward (module:function) runs only when the user names it again, as `user_reward`
    (inference.py --reward), and that name must equal the recorded one."""
    checkpoint = load_checkpoint(path, FORMAT)
    name = checkpoint.get("reward", "resnet18-random")
    if not isinstance(name, str) or not name:
        raise UserError(f"reward model {str(path)!r}: field 'reward' is {name!r}; expected a reward name")
    if user_reward is not None and user_reward != name:
        raise InputError("reward", f"{user_reward!r} does not match the reward {name!r} recorded in {str(path)!r}")
    meta = plain_metadata(checkpoint, path)
    if name == "resnet18-random":
        model = resnet18.model_from_checkpoint(checkpoint, path)
        return ResNetReward(model, checkpoint.get("weights", "?"), checkpoint.get("seed", 0)), meta
    if name == "aesthetic":
        return Aesthetic(checkpoint["state_dict"]), meta
    if name == "compressibility":
        return Compressibility(), meta
    if ":" not in name:
        raise UserError(f"reward model {str(path)!r} records the reward {name!r}; expected one of {', '.join(BUILT_IN)} "
                        "or module:function")
    if user_reward is None:
        raise UserError(f"reward model {str(path)!r} records the user-code reward {name!r}; loading a file never runs code, "
                        f"so pass --reward {name!r} to run it")
    return UserFunction(user_reward), meta
