"""fake_dataset.py end to end: files, order, determinism, noise, reload, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import error_line, run_cli, run_script
from PIL import Image

from rcgdm.data import SyntheticShapes, load_batch, open_source
from rcgdm.rewards import load_reward
from rcgdm.rewards import resnet18 as reward

OUTPUTS = ("reward_model.pth", "cifar10_outputs_with_noise.npy", "cifar10_outputs_with_noise.json")


def _run(out_dir, *extra, data="synthetic", num_data=40):
    args = ["--data", data, "--weights", "none", "--out_dir", out_dir, "--batch_size", "16", *extra]
    if num_data is not None:
        args += ["--num_data", str(num_data)]
    assert run_script("fake_dataset.py", *args) == 0


def _clean_rewards(out_dir, source, n):
    loaded, meta = load_reward(out_dir / "reward_model.pth")
    model = loaded.model
    return reward.score(model, load_batch(source, range(n), 224)).numpy(), meta


def test_outputs_shapes_and_provenance(tmp_path):
    _run(tmp_path)
    labels = np.load(tmp_path / "cifar10_outputs_with_noise.npy")
    assert labels.shape == (40, 1) and labels.dtype == np.float32
    checkpoint = torch.load(tmp_path / "reward_model.pth", weights_only=True)
    assert checkpoint["arch"] == "resnet18-linear1" and checkpoint["weights"] == "none" and checkpoint["seed"] == 0
    assert checkpoint["state_dict"]["fc.weight"].shape == (1, 512)
    sidecar = json.loads((tmp_path / "cifar10_outputs_with_noise.json").read_text())
    assert sidecar["data"] == "synthetic:0" and sidecar["num_data"] == 40 and sidecar["noise_std"] == 0.1
    assert sidecar["weights"] == "none" and sidecar["seed"] == 0 and "torch" in sidecar["versions"]
    from rcgdm.files.provenance import sha256_file

    assert sidecar["reward_model_sha256"] == sha256_file(tmp_path / "reward_model.pth")


def test_same_seed_same_bytes_other_seed_other_labels(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        _run(tmp_path / name, "--seed", seed, num_data=8)
    for file in OUTPUTS:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert not np.array_equal(np.load(tmp_path / "a" / OUTPUTS[1]), np.load(tmp_path / "c" / OUTPUTS[1]))


def test_noise_statistics_and_reload_reproduces_clean_rewards(tmp_path):
    _run(tmp_path, "--noise_std", "0.5", num_data=160)
    labels = np.load(tmp_path / "cifar10_outputs_with_noise.npy")
    clean, meta = _clean_rewards(tmp_path, SyntheticShapes(), 160)
    assert meta["weights"] == "none"
    residual = labels - clean
    assert abs(residual.std() - 0.5) < 0.1 and abs(residual.mean()) < 0.15
    assert clean.std() > 1e-3  # the images get different rewards


def test_row_order_follows_the_folder_order(tmp_path):
    images = tmp_path / "images"
    for i, name in enumerate(["b/2.png", "a.jpg", "b/1.png", "c.webp"]):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 24), (40 * i, 200 - 30 * i, 90)).save(images / name)
    _run(tmp_path / "out", "--noise_std", "0", data=str(images), num_data=None)
    labels = np.load(tmp_path / "out" / "cifar10_outputs_with_noise.npy")
    source = open_source(str(images))
    assert [p.name for p in source.files] == ["a.jpg", "1.png", "2.png", "c.webp"]
    model = load_reward(tmp_path / "out" / "reward_model.pth")[0].model
    one_by_one = np.concatenate([reward.score(model, load_batch(source, [i], 224)).numpy() for i in range(4)])
    np.testing.assert_allclose(labels, one_by_one, rtol=1e-4, atol=1e-5)
    assert len(np.unique(labels.round(5))) == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--num_data", "0"], "--num_data: '0' is too small; expected an integer >= 1"),
        (["--num_data", "-3"], "--num_data: '-3' is too small; expected an integer >= 1"),
        (["--num_data", "50001"], "--num_data 50001 is out of range; expected 1 to 50000"),
        (["--num_data", "ten"], "--num_data: 'ten' is not an integer"),
        (["--noise_std", "-0.1"], "--noise_std: '-0.1' is negative; expected a finite number >= 0"),
        (["--noise_std", "nan"], "--noise_std: 'nan' is not finite"),
        (["--weights", "resnet50"], "--weights 'resnet50' is unknown; expected one of imagenet, none"),
        (["--batch_size", "0"], "--batch_size: '0' is too small"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["--data", "MISSING"], "does not exist; expected cifar10, synthetic or an image folder"),
        (["--data", "EMPTY"], "holds no images"),
        (["--out_dir", "A_FILE"], "is a file; expected a directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    swap = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"), "A_FILE": str(tmp_path / "a_file")}
    args = [swap.get(a, a) for a in args]
    out_dir = tmp_path / "out"
    base = ["--data", "synthetic", "--weights", "none", "--num_data", "4", "--out_dir", str(out_dir)]
    assert run_script("fake_dataset.py", *base, *args) == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line
    assert not any((out_dir / f).exists() for f in OUTPUTS)


def test_unwritable_out_dir(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root may write anywhere, so make the permission check see what a user would
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    assert run_script("fake_dataset.py", "--data", "synthetic", "--weights", "none", "--num_data", "4", "--out_dir", locked) == 2
    assert "is not writable" in error_line(capsys.readouterr().err)


def test_out_dir_under_a_file_cannot_be_created(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    args = ["--data", "synthetic", "--weights", "none", "--num_data", "4", "--out_dir", tmp_path / "f" / "sub"]
    assert run_script("fake_dataset.py", *args) == 2
    assert "cannot be created" in error_line(capsys.readouterr().err)


def test_imagenet_weights_offline_fail_clearly(tmp_path, capsys, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    args = ["--data", "synthetic", "--num_data", "4", "--out_dir", tmp_path / "out"]
    assert run_script("fake_dataset.py", *args) == 2
    line = error_line(capsys.readouterr().err)
    assert "--weights imagenet" in line and "use --weights none" in line
    assert not any((tmp_path / "out" / f).exists() for f in OUTPUTS)


def test_cli_as_a_user_runs_it(tmp_path, capsys):
    ok = run_cli("fake_dataset.py", "--data", "synthetic", "--num_data", "8", "--weights", "none", "--out_dir", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "random" in ok.stdout.lower() and "8 labels" in ok.stdout
    assert run_script("fake_dataset.py", "--noise_std", "-1") == 2
    expected = "error: argument --noise_std: '-1' is negative; expected a finite number >= 0 (see --help)"
    assert error_line(capsys.readouterr().err) == expected


def test_the_reward_input_is_resized_and_normalised_as_torchvision_does():
    """Checked against torchvision's own Resize and the normalisation constants its ImageNet weights record."""
    from torchvision.models import ResNet18_Weights
    from torchvision.transforms import InterpolationMode, v2

    from rcgdm.rewards.resnet18 import preprocess

    reference = ResNet18_Weights.IMAGENET1K_V1.transforms()
    by_torchvision = v2.Compose([v2.Resize((224, 224), interpolation=InterpolationMode.BILINEAR, antialias=True),
                                 v2.Normalize(mean=reference.mean, std=reference.std)])
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = preprocess(images)
    assert ours.shape == (3, 3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, by_torchvision(images), rtol=0, atol=1e-5)
