"""The LAION aesthetic score: an MLP on CLIP ViT-L/14 image embeddings, both from the hub."""

from __future__ import annotations

import socket

import torch
from torch import nn

from rcgdm.cli import InputError
from rcgdm.data import DOWNLOAD_TIMEOUT_S
from rcgdm.rewards.base import FORMAT, Reward, at_reward_size

CLIP_ID = "openai/clip-vit-large-patch14"
AESTHETIC_REPO, AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (its state_dict keys: layers.{0,2,4,6,7})."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

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
            raise InputError("reward",
                f"aesthetic: {CLIP_ID} or {AESTHETIC_REPO} could not be loaded ({type(err).__name__}); "
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
        return {"format": FORMAT, "reward": self.name, "clip": CLIP_ID, "state_dict": self.head.cpu().state_dict()}
