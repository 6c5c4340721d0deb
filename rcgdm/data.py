"""Image sources shared by the scripts: CIFAR-10 (train), synthetic shapes, or a folder.

Every source yields RGB images as uint8 tensors of shape (3, H, W), in a fixed order:
- ``cifar10``: the 50,000 CIFAR-10 training images, in the dataset's own order;
- ``synthetic`` (or ``synthetic:SEED``): 50,000 generated 32x32 images of coloured shapes, with captions;
  image i depends only on (SEED, i), so any prefix is the same whatever the length;
- a directory: every .png/.jpg/.jpeg/.webp below it, recursively, sorted by relative path.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from rcgdm.cli import InputError, UserError
from rcgdm.files.png import to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SYNTHETIC_SIZE = 50_000
SYNTHETIC_RESOLUTION = 32
DOWNLOAD_TIMEOUT_S = 15


class ImageSource:
    """A fixed, indexable sequence of RGB images."""

    #: a short, stable description of the data (used in sidecars and cache keys)
    identity: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 RGB, shape (3, H, W)."""
        raise NotImplementedError


COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 75, 215), "yellow": (235, 210, 45),
    "orange": (240, 135, 30), "purple": (130, 55, 180), "white": (235, 235, 235), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class SyntheticShapes(ImageSource):
    """Deterministic images of one to three coloured shapes (circle, square, triangle) on a coloured
    background, each colour one of `COLOURS` (slightly jittered), with a caption saying how it was
    drawn: "a red circle and a blue square on a green background"."""

    seed: int = 0
    size: int = SYNTHETIC_SIZE

    @property
    def identity(self) -> str:  # type: ignore[override]
        return f"synthetic:{self.seed}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.draw(index)[0]

    def caption(self, index: int) -> str:
        return self.draw(index)[1]

    def draw(self, index: int) -> tuple[torch.Tensor, str]:
        """Image `index` (uint8 (3, 32, 32)) and its caption."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        names = list(COLOURS)
        res = SYNTHETIC_RESOLUTION

        def colour(name: str) -> tuple[int, ...]:
            return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[name])

        background = names[int(rng.integers(len(names)))]
        image = Image.new("RGB", (res, res), colour(background))
        draw = ImageDraw.Draw(image)
        phrases = []
        for _ in range(int(rng.integers(1, 4))):
            name = names[int(rng.integers(len(names) - 1))]
            name = name if name != background else names[-1]  # never the background's colour
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            side = int(rng.integers(10, 21))
            x0, y0 = (int(v) for v in rng.integers(0, res - side + 1, 2))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if kind == "circle":
                draw.ellipse(box, fill=colour(name))
            elif kind == "square":
                draw.rectangle(box, fill=colour(name))
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour(name))
            phrases.append(f"{_article(name)} {name} {kind}")
        shapes = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return pil_to_tensor(image), f"{shapes} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class ImageFolder(ImageSource):
    """All images below a directory, recursively, sorted by relative path."""

    root: Path
    files: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            suffixes = "/".join(IMAGE_SUFFIXES)
            raise InputError("data", f"{str(self.root)!r} holds no images; expected a folder with {suffixes} files")

    @property
    def identity(self) -> str:  # type: ignore[override]
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"folder:{self.root.resolve()}:{digest.hexdigest()[:16]}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return torch.from_numpy(to_rgb(image).copy()).permute(2, 0, 1).contiguous()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"image {str(path)!r} cannot be read ({err}); expected a valid image file") from None


@dataclass
class Cifar10Train(ImageSource):
    """The CIFAR-10 training split (50,000 images), downloaded into `root` on first use."""

    root: Path
    identity: str = "cifar10:train"
    images: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from torchvision.datasets import CIFAR10

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            self.images = CIFAR10(str(self.root), train=True, download=True).data  # (N, 32, 32, 3) uint8
        except Exception as err:  # network errors come in many types
            raise InputError("data",
                f"cifar10 could not be loaded or downloaded into {str(self.root)!r} ({type(err).__name__}); "
                "offline, use --data synthetic or --data PATH_TO_IMAGE_FOLDER"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


def open_source(spec: str, data_root: str | Path = "./data") -> ImageSource:
    """`cifar10`, `synthetic[:SEED]` or a directory path -> an ImageSource."""
    if spec == "cifar10":
        return Cifar10Train(Path(data_root))
    if spec == "synthetic" or spec.startswith("synthetic:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise InputError("data", f"{spec!r} has a bad seed; expected synthetic or synthetic:N with N >= 0")
        return SyntheticShapes(seed=int(seed_text))
    path = Path(spec)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise InputError("data", f"{spec!r} {what}; expected cifar10, synthetic or an image folder")
    return ImageFolder(path)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, 3, H, W) -> (B, 3, size, size), bilinear with antialiasing (a no-op at that
    size already), clamped to [0, 1]. Every resize of the project goes through here."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0.0, 1.0)


def load_batch(source: ImageSource, indices: range | list[int], size: int) -> torch.Tensor:
    """Images `indices` resized to size x size: float32 (B, 3, size, size) in [0, 1]."""
    return torch.cat([resize(source[index].unsqueeze(0).float() / 255.0, size) for index in indices])


def check_num_data(num_data: int | None, source: ImageSource) -> int:
    """Resolve None to 'all' and check 1 <= num_data <= len(source)."""
    if num_data is None:
        return len(source)
    if not 1 <= num_data <= len(source):
        raise InputError("num_data", f"{num_data} is out of range; expected 1 to {len(source)} (the images in {source.identity})")
    return num_data
