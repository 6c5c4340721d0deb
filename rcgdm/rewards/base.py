"""What every ground-truth reward is: images (B, 3, H, W) in [0, 1] -> rewards (B,) float32 on the CPU,
judged at 224x224 (so a dataset image and a generated one are seen at the same size)."""

from __future__ import annotations

import torch

from rcgdm.data import resize

FORMAT = "rcgdm.reward/1"  # reward_model.pth, whatever the reward
SIZE = 224


def at_reward_size(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, 224, 224), float32 in [0, 1]."""
    return resize(images.float(), SIZE)


class Reward:
    """A named ground-truth reward."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> Reward:
        return self

    def checkpoint(self) -> dict:
        return {"format": FORMAT, "reward": self.name, "state_dict": {}}


