"""The paper's ground-truth reward: ResNet18 (ImageNet or random backbone) with a random Linear(512, 1) head.

Checkpoint format (``reward_model.pth``), loadable with ``torch.load(weights_only=True)``::

    {"format": "rcgdm.reward/1", "arch": "resnet18-linear1",
     "weights": "imagenet" | "none", "seed": int, "state_dict": {...}}
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch import nn

from rcgdm.cli import InputError, UserError
from rcgdm.data import DOWNLOAD_TIMEOUT_S, resize
from rcgdm.files.checkpoint import check_finite_state
from rcgdm.rewards.base import FORMAT, SIZE, Reward, at_reward_size

ARCH = "resnet18-linear1"
WEIGHT_CHOICES = ("imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resnet18(weights: str) -> nn.Module:
    from torchvision.models import ResNet18_Weights, resnet18

    if weights == "none":
        return resnet18(weights=None)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
    except Exception as err:  # network errors come in many types
        raise InputError("weights",
            f"imagenet: the ImageNet ResNet18 weights could not be loaded or downloaded ({type(err).__name__}); "
            "offline, use --weights none for a random backbone"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def build_reward_model(weights: str, seed: int) -> nn.Module:
    """ResNet18 with its `fc` replaced by a freshly initialised Linear(512, 1), in eval mode.

    The new head (and, for weights='none', the whole backbone) is initialised from `seed`.
    """
    if weights not in WEIGHT_CHOICES:
        raise InputError("weights", f"{weights!r} is unknown; expected one of {', '.join(WEIGHT_CHOICES)}")
    torch.manual_seed(seed)
    model = _resnet18(weights)
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model.eval()


def reward_checkpoint(model: nn.Module, weights: str, seed: int) -> dict:
    return {"format": FORMAT, "arch": ARCH, "weights": weights, "seed": seed, "state_dict": model.state_dict()}


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> nn.Module:
    """The reward network of an already loaded checkpoint (read from `path`, named in errors), in eval mode."""
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 1)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"reward model {str(path)!r} does not match a {ARCH} network ({str(err).splitlines()[0]})") from None
    check_finite_state(model.state_dict(), path, "reward model")
    return model.eval()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] -> (B, 3, 224, 224), ImageNet-normalised."""
    images = resize(images, SIZE)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@torch.inference_mode()
def score(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Ground-truth rewards of float images (B, 3, H, W) in [0, 1] -> float32 (B, 1)."""
    device = next(model.parameters()).device
    return model(preprocess(images.to(device, torch.float32))).float().cpu()


class ResNetReward(Reward):
    name = "resnet18-random"

    def __init__(self, model: nn.Module, weights: str, seed: int) -> None:
        self.model, self.weights, self.seed = model, weights, seed

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return score(self.model, at_reward_size(images))[:, 0]

    def to(self, device: torch.device) -> Reward:
        self.model.to(device)
        return self

    def checkpoint(self) -> dict:
        return {**reward_checkpoint(self.model.cpu(), self.weights, self.seed), "reward": self.name}
