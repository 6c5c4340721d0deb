"""The reward predictor mu(x): a 3-layer residual ConvNet on (noisy) SD VAE latents.

Checkpoint format (``convnet.pth``), loadable with ``torch.load(weights_only=True)``::

    {"format": "rcgdm.predictor/1", "arch": "ThreeLayerConvNet", "latent_channels": 4,
     "latent_size": [64, 64], "model": str, "label_mean": float, "label_std": float,
     "epochs": int, "val_loss": float | None, "reference_latents": float16 (K, C, h, w),
     "state_dict": {...}}

`reference_latents` holds up to 512 of the training latents (clean), a seeded sample: inference
measures how far generated latents drift from them (rcgdm.evaluate.distribution_shift).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rcgdm.cli import UserError
from rcgdm.files.checkpoint import check_finite_state, load_checkpoint, plain_metadata

FORMAT = "rcgdm.predictor/1"
ARCH = "ThreeLayerConvNet"


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU.
    Parameter names are the original code's (conv1, bn1, conv2, bn2, shortcut), so state_dicts cross."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()  # the identity; empty, as the original's
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ThreeLayerConvNet(nn.Module):
    """Latents (B, C, H, W), any H and W -> predicted rewards (B, 1). Named as the original's
    (layer1..3, avgpool, fc): a state_dict saved by either code loads into the other."""

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        self.layer1 = ResidualBlock(in_channels, 64, stride=1)
        self.layer2 = ResidualBlock(64, 128, stride=2)
        self.layer3 = ResidualBlock(128, 256, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(out).flatten(1))


_OLD_NAMES = {"blocks.0.": "layer1.", "blocks.1.": "layer2.", "blocks.2.": "layer3.", "head.": "fc."}


def current_names(state_dict: dict) -> dict:
    """A state_dict written before the parameters took the original's names (blocks.0..2, head) -> today's names."""
    out = {}
    for key, value in state_dict.items():
        old = next((prefix for prefix in _OLD_NAMES if isinstance(key, str) and key.startswith(prefix)), None)
        out[key if old is None else _OLD_NAMES[old] + key[len(old) :]] = value
    return out


REFERENCE_LATENTS = 512


def reference_sample(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded sample of up to REFERENCE_LATENTS training latents (K, C, h, w), float16, for the checkpoint."""
    pick = torch.randperm(len(latents), generator=torch.Generator().manual_seed(seed))[:REFERENCE_LATENTS].sort().values
    return latents[pick].detach().cpu().half().contiguous()


def predictor_checkpoint(model: ThreeLayerConvNet, meta: dict, reference: torch.Tensor | None = None) -> dict:
    extra = {} if reference is None else {"reference_latents": reference}
    return {"format": FORMAT, "arch": ARCH, **meta, **extra, "state_dict": model.state_dict()}


def load_predictor_state(model: ThreeLayerConvNet, state_dict: dict, path: str | Path) -> ThreeLayerConvNet:
    """`model` with `state_dict` loaded (either naming: ours, earlier ones, the original's), checked finite, in eval mode."""
    try:
        model.load_state_dict(current_names(state_dict))
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"predictor {str(path)!r} does not match a {ARCH} ({str(err).splitlines()[0]})") from None
    check_finite_state(model.state_dict(), path, "predictor")
    return model.eval()


def load_predictor(path: str | Path, latent_channels: int | None = None) -> tuple[ThreeLayerConvNet, dict]:
    """Rebuild a trained predictor (eval mode) -> (model, metadata); checks the latent channels if given."""
    return predictor_from_checkpoint(load_checkpoint(path, FORMAT), path, latent_channels)


def predictor_from_checkpoint(checkpoint: dict, path: str | Path, latent_channels: int | None = None) -> tuple:
    """The predictor of an already loaded checkpoint (read from `path`, named in errors) -> (model, metadata)."""
    channels = checkpoint.get("latent_channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise UserError(f"predictor {str(path)!r}: field 'latent_channels' is {channels!r}; expected an integer >= 1")
    if latent_channels is not None and channels != latent_channels:
        raise UserError(
            f"predictor {str(path)!r} was trained on {channels}-channel latents; the model's VAE makes {latent_channels}"
        )
    model = load_predictor_state(ThreeLayerConvNet(in_channels=channels), checkpoint["state_dict"], path)
    return model, plain_metadata(checkpoint, path, skip=("state_dict", "reference_latents"))


def load_reference_latents(path: str | Path) -> torch.Tensor | None:
    """The training latents a predictor checkpoint carries (K, C, h, w) float32, or None (older checkpoints)."""
    return reference_from_checkpoint(load_checkpoint(path, FORMAT), path)


def reference_from_checkpoint(checkpoint: dict, path: str | Path) -> torch.Tensor | None:
    """The training latents of an already loaded predictor checkpoint (read from `path`, named in errors)."""
    reference = checkpoint.get("reference_latents")
    if reference is None:
        return None
    if not isinstance(reference, torch.Tensor) or reference.ndim != 4 or not torch.isfinite(reference).all():
        raise UserError(f"predictor {str(path)!r}: field 'reference_latents' is not a finite (K, C, h, w) tensor")
    return reference.float()
