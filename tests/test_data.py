"""Image sources: synthetic, folders, CIFAR-10's offline failure."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from rcgdm.cli import UserError
from rcgdm.data import SyntheticShapes, check_num_data, load_batch, open_source


def test_synthetic_is_deterministic_varied_and_prefix_stable():
    a, b = open_source("synthetic"), SyntheticShapes(seed=0, size=10)
    first = [a[i] for i in range(10)]
    assert all(torch.equal(x, b[i]) for i, x in enumerate(first))
    assert first[0].dtype == torch.uint8 and first[0].shape == (3, 32, 32)
    assert len({x.numpy().tobytes() for x in first}) == 10
    assert not torch.equal(open_source("synthetic:1")[0], first[0])
    assert len(a) == 50_000


def _write_folder(root, sizes):
    paths = []
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(v) for v in np.random.default_rng(len(paths)).integers(0, 256, 3))
        Image.new("RGB", size, colour).save(path)
        paths.append(path)
    return paths


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    _write_folder(tmp_path, {"b.png": (8, 8), "a/z.jpg": (10, 6), "a/y.webp": (4, 4), "c.PNG": (5, 5)})
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in source.files] == ["a/y.webp", "a/z.jpg", "b.png", "c.PNG"]
    assert source[1].shape == (3, 6, 10)
    batch = load_batch(source, range(4), 16)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0


def test_folder_identity_changes_with_content(tmp_path):
    _write_folder(tmp_path, {"a.png": (4, 4)})
    before = open_source(str(tmp_path)).identity
    _write_folder(tmp_path, {"b.png": (4, 4)})
    assert open_source(str(tmp_path)).identity != before


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    source = open_source(str(tmp_path))
    with pytest.raises(UserError, match=r"broken\.png"):
        source[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("missing", "does not exist"), ("synthetic:x", "bad seed")],
)
def test_bad_specs(tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        open_source(str(tmp_path / spec) if spec == "missing" else spec)


def test_empty_folder_and_file(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        open_source(str(tmp_path))
    (tmp_path / "f.png").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        open_source(str(tmp_path / "f.png"))


def test_num_data_range():
    source = SyntheticShapes(size=5)
    assert check_num_data(None, source) == 5
    assert check_num_data(3, source) == 3
    for bad in (0, -1, 6):
        with pytest.raises(UserError, match=f"num_data {bad} is out of range; expected 1 to 5"):
            check_num_data(bad, source)


def test_cifar10_offline_fails_fast_with_a_hint(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match="data synthetic"):
        open_source("cifar10", tmp_path)
    assert time.monotonic() - start < 30


def test_atomic_writes_leave_only_the_final_file_with_normal_permissions(tmp_path):
    import os

    from rcgdm.files.atomic import atomic_path, save_json

    save_json({"a": 1}, tmp_path / "x.json")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def mode_images() -> dict:
    """An image of each awkward mode -> (the image, the RGB pixel it must read as; None: refused)."""
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    return {
        "grey16.png": (Image.fromarray(np.full((4, 4), 32768, np.uint16)), (128, 128, 128)),  # 16-bit mid-grey
        "grey16_white.png": (Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
        "rgba.png": (half_red, (255, 127, 127)),  # over white
        "la.png": (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent black
        "palette.png": (palette, (255, 255, 255)),  # its only colour is the transparent one
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        "bilevel.png": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_every_image_mode_reads_as_its_rgb_or_is_refused(tmp_path, name):
    image, expected = mode_images()[name]
    image.save(tmp_path / name)
    pixels = open_source(str(tmp_path))[0]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 4, 4)
    assert (pixels.view(3, -1) - torch.tensor(expected)[:, None]).abs().max() <= 1, (name, pixels[:, 0, 0])


def test_float_pixels_with_no_known_range_are_refused_and_32_bit_greys_scaled():
    from rcgdm.files.png import to_rgb

    with pytest.raises(ValueError, match="no known range"):
        to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32)))
    assert to_rgb(Image.fromarray(np.full((4, 4), 32768, np.int32)))[0, 0].tolist() == [128, 128, 128]  # mode I
