"""Reading the original RCGDM code's pickled files safely, and crossing state_dicts with it."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torchvision
from conftest import error_line, run_cli, run_script
from test_hostile_files import WritesAMarker
from torch import nn

from rcgdm.predictor import ThreeLayerConvNet, load_predictor
from rcgdm.rewards import load_reward
from rcgdm.rewards.resnet18 import score


def original_module() -> types.ModuleType:
    """Classes written as the original's model.py has them, living in a module named `model`."""
    module = types.ModuleType("model")

    class ResidualBlock(nn.Module):
        def __init__(self, in_channels, out_channels, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_channels)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_channels != out_channels:
                self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(out_channels))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return self.relu(out)

    class ThreeLayerConvNet(nn.Module):
        def __init__(self, num_channels, num_classes=1):
            super().__init__()
            self.layer1 = ResidualBlock(num_channels, 64, stride=1)
            self.layer2 = ResidualBlock(64, 128, stride=2)
            self.layer3 = ResidualBlock(128, 256, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(256, num_classes)

        def forward(self, x):
            out = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(out.view(out.size(0), -1))

    for cls in (ResidualBlock, ThreeLayerConvNet):
        cls.__module__, cls.__qualname__ = "model", cls.__name__
        setattr(module, cls.__name__, cls)
    return module


@pytest.fixture
def original_files(tmp_path, monkeypatch):
    """(convnet.pth, reward_model.pth) as the original scripts save them (whole pickled modules), and the modules."""
    model = original_module()
    monkeypatch.setitem(sys.modules, "model", model)
    torch.manual_seed(0)
    convnet = model.ThreeLayerConvNet(4)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so eval mode differs from a fresh net
        for m in convnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    reward = torchvision.models.resnet18(weights=None)
    reward.fc = nn.Linear(reward.fc.in_features, 1)
    torch.save(convnet, tmp_path / "convnet.pth")
    torch.save(reward, tmp_path / "reward_model.pth")
    monkeypatch.delitem(sys.modules, "model")  # the converter must not need the original's code
    return tmp_path / "convnet.pth", tmp_path / "reward_model.pth", convnet.eval(), reward.eval()


def test_converted_files_give_the_originals_outputs(tmp_path, capsys, original_files):
    convnet_path, reward_path, convnet, reward = original_files
    out = tmp_path / "converted"
    result = run_cli("-m", "rcgdm.convert_original", convnet_path, reward_path, "--out_dir", out)
    assert result.returncode == 0, result.stderr
    assert "unknown" in result.stdout

    loaded = load_predictor(out / "convnet.pth", latent_channels=4)
    predictor, meta = loaded.net, loaded.meta
    assert meta["latent_size"] is None and meta["label_mean"] is None and meta["noised"] is True
    latents = torch.randn(5, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(predictor(latents), convnet(latents), rtol=0, atol=1e-6)

    loaded, reward_meta = load_reward(out / "reward_model.pth")
    model = loaded.model
    assert reward_meta["reward"] == "resnet18-random" and reward_meta["weights"] is None
    images = torch.rand(3, 3, 32, 32)
    from rcgdm.rewards.resnet18 import preprocess

    with torch.no_grad():
        torch.testing.assert_close(score(model, images), reward(preprocess(images)), rtol=0, atol=1e-5)


def test_state_dicts_cross_between_the_two_codes(original_files):
    _, _, convnet, _ = original_files
    ours = ThreeLayerConvNet(4).eval()
    ours.load_state_dict(convnet.state_dict())  # original -> ours, by name
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(ours(x), convnet(x))
    back = original_module().ThreeLayerConvNet(4).eval()
    back.load_state_dict(ours.state_dict())  # ours -> original
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path, original_files, capsys):
    convnet_path, reward_path, _, _ = original_files
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"weights": WritesAMarker(str(marker))}, hostile)
    other_class = tmp_path / "other.pth"
    torch.save(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1), other_class)
    for convnet, reward in ((hostile, reward_path), (convnet_path, hostile), (other_class, reward_path)):
        assert run_script("-m", "rcgdm.convert_original", convnet, reward, "--out_dir", tmp_path / "out") == 2
        line = error_line(capsys.readouterr().err)
        assert "was refused" in line and "nothing in it was run" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_originals_float64_labels_train_without_a_sidecar(tmp_path, capsys):
    labels = tmp_path / "cifar10_outputs_with_noise.npy"
    np.save(labels, np.random.default_rng(0).normal(size=(16, 1)))  # float64, as the original's NumPy noise makes them
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1", "--val_fraction=0",
            f"--labels_path={labels}", f"--out_path={tmp_path / 'convnet.pth'}", f"--cache_dir={tmp_path / 'cache'}"]
    assert run_script("train.py", *args) == 0
    out = capsys.readouterr().out
    assert out.count("cannot be verified") == 1
