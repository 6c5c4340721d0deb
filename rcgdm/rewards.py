"""Ground-truth rewards as plug-ins. Every reward maps images (B, 3, H, W), float in [0, 1], to
rewards (B,) float32 on the CPU, after resizing the images to 224x224 (the same for every reward,
so a dataset image and a generated one are judged at the same size).

- ``resnet18-random``: the paper's ResNet18 with a random Linear(512, 1) head (rcgdm/reward.py);
- ``compressibility``: minus the JPEG size in kB at quality 95, as in DDPO; no weights, offline;
- ``aesthetic``: the LAION aesthetic predictor (an MLP on CLIP ViT-L/14 image embeddings), from the hub;
- ``module:function`` or ``path/to/file.py:function``: your own `images -> rewards` function.

`reward_model.pth` stores which one (and its weights where it has any); `load_reward` rebuilds it.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from rcgdm import reward as resnet
from rcgdm.checkpoint import load_checkpoint, plain_metadata
from rcgdm.cli import UserError
from rcgdm.data import DOWNLOAD_TIMEOUT_S, resize

BUILT_IN = ("resnet18-random", "compressibility", "aesthetic")
SIZE = 224
JPEG_QUALITY = 95
CLIP_ID = "openai/clip-vit-large-patch14"
AESTHETIC_REPO, AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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
        return {"format": resnet.FORMAT, "reward": self.name, "state_dict": {}}


class ResNetReward(Reward):
    name = "resnet18-random"

    def __init__(self, model: nn.Module, weights: str, seed: int) -> None:
        self.model, self.weights, self.seed = model, weights, seed

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return resnet.score(self.model, at_reward_size(images))[:, 0]

    def to(self, device: torch.device) -> Reward:
        self.model.to(device)
        return self

    def checkpoint(self) -> dict:
        return {**resnet.reward_checkpoint(self.model.cpu(), self.weights, self.seed), "reward": self.name}


def jpeg_kilobytes(image: torch.Tensor) -> float:
    """Size in kB (1000 bytes) of one image (3, H, W) in [0, 1] as a quality-95 JPEG."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


class Compressibility(Reward):
    """Minus the JPEG size in kB: smaller files score higher (DDPO's compressibility)."""

    name = "compressibility"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([-jpeg_kilobytes(image) for image in at_reward_size(images).cpu()], dtype=torch.float32)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (its state_dict keys: layers.{0,2,4,6,7})."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class Aesthetic(Reward):
    """The LAION aesthetic score: an MLP on the L2-normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, head_state: dict | None = None) -> None:
        from huggingface_hub import hf_hub_download
        from transformers import CLIPVisionModelWithProjection

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(CLIP_ID).eval()
            if head_state is None:
                head_state = torch.load(hf_hub_download(AESTHETIC_REPO, AESTHETIC_FILE), map_location="cpu", weights_only=True)
        except Exception as err:  # offline hub errors come in many types
            raise UserError(
                f"--reward aesthetic: {CLIP_ID} or {AESTHETIC_REPO} could not be loaded ({type(err).__name__}); "
                "offline, use --reward compressibility or resnet18-random"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        self.head = AestheticHead().eval()
        self.head.load_state_dict(head_state)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        pixels = (at_reward_size(images).to(device) - mean) / std
        embedding = self.clip(pixel_values=pixels).image_embeds
        return self.head(embedding / embedding.norm(dim=-1, keepdim=True))[:, 0].float().cpu()

    def to(self, device: torch.device) -> Reward:
        self.clip.to(device)
        self.head.to(device)
        return self

    def checkpoint(self) -> dict:
        return {"format": resnet.FORMAT, "reward": self.name, "clip": CLIP_ID, "state_dict": self.head.cpu().state_dict()}


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
                if str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))  # scripts put their own folder first, not the user's
                module = importlib.import_module(module_name)
        except Exception as err:  # a user's module can fail to import in any way
            reason = f"{type(err).__name__}: {err}"
            raise UserError(f"--reward {spec!r}: module {module_name!r} cannot be imported ({reason})") from None
        self.function = getattr(module, function_name, None)
        if not callable(self.function):
            raise UserError(f"--reward {spec!r}: {module_name!r} has no function {function_name!r}; expected module:function")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = at_reward_size(images).cpu()
        rewards = torch.as_tensor(np.asarray(self.function(images), dtype=np.float32)).reshape(-1)
        if rewards.shape != (len(images),) or not torch.isfinite(rewards).all():
            raise UserError(f"--reward {self.name!r} returned {tuple(rewards.shape)} values for {len(images)} images, "
                            "or non-finite ones; expected one finite number per image")  # fmt: skip
        return rewards


def build_reward(name: str, weights: str = "imagenet", seed: int = 0) -> Reward:
    """A reward by name (fake_dataset.py --reward); `weights` and `seed` shape resnet18-random only."""
    if name == "resnet18-random":
        return ResNetReward(resnet.build_reward_model(weights, seed), weights, seed)
    if name == "compressibility":
        return Compressibility()
    if name == "aesthetic":
        return Aesthetic()
    if ":" in name:
        return UserFunction(name)
    raise UserError(f"--reward {name!r} is unknown; expected one of {', '.join(BUILT_IN)} or module:function")


def load_reward(path: str | Path, user_reward: str | None = None) -> tuple[Reward, dict]:
    """Rebuild the reward that reward_model.pth was written for -> (reward, metadata).

    The file is data: the reward name it records is compared with names, never imported. A
    user-code reward (module:function) runs only when the user names it again, as `user_reward`
    (inference.py --reward), and that name must equal the recorded one."""
    checkpoint = load_checkpoint(path, resnet.FORMAT)
    name = checkpoint.get("reward", "resnet18-random")
    if not isinstance(name, str) or not name:
        raise UserError(f"reward model {str(path)!r}: field 'reward' is {name!r}; expected a reward name")
    if user_reward is not None and user_reward != name:
        raise UserError(f"--reward {user_reward!r} does not match the reward {name!r} recorded in {str(path)!r}")
    meta = plain_metadata(checkpoint, path)
    if name == "resnet18-random":
        model = resnet.model_from_checkpoint(checkpoint, path)
        return ResNetReward(model, checkpoint.get("weights", "?"), checkpoint.get("seed", 0)), meta
    if name == "aesthetic":
        return Aesthetic(checkpoint["state_dict"]), meta
    if name == "compressibility":
        return Compressibility(), meta
    if ":" not in name:
        raise UserError(f"reward model {str(path)!r} records the reward {name!r}; expected one of {', '.join(BUILT_IN)} "
                        "or module:function")  # fmt: skip
    if user_reward is None:
        raise UserError(f"reward model {str(path)!r} records the user-code reward {name!r}; loading a file never runs code, "
                        f"so pass --reward {name!r} to run it")  # fmt: skip
    return UserFunction(user_reward), meta
