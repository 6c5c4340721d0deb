"""Import the original RCGDM code's pickled files, safely, into this project's formats.

The original saves whole modules (`torch.save(convnet, 'convnet.pth')`, `torch.save(model,
'reward_model.pth')`). Those pickles are read here with `torch.load(weights_only=True)` under an
explicit allowlist: the torch.nn layers the two models contain, torchvision's ResNet and
BasicBlock, and this project's ThreeLayerConvNet and ResidualBlock standing in for the original's
`model.ThreeLayerConvNet` and `model.ResidualBlock` (same parameter names). Nothing else may load: a
pickle naming any other global (os.system, builtins.eval, another class) is refused, and nothing runs.

    python -m rcgdm.convert_original convnet.pth reward_model.pth --out_dir converted

writes converted/convnet.pth (predictor) and converted/reward_model.pth (ground-truth reward).
Metadata the original files lack (latent size, label mean and std, weights source) is recorded as
unknown (None).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from rcgdm.cli import ArgumentParser, UserError, check_creatable, run_main, writable_dir
from rcgdm.files.atomic import save_torch
from rcgdm.files.output_checks import refuse_existing, refuse_inputs_as_outputs
from rcgdm.predictor import ResidualBlock, ThreeLayerConvNet, predictor_checkpoint
from rcgdm.rewards.resnet18 import ARCH as REWARD_ARCH
from rcgdm.rewards.resnet18 import FORMAT as REWARD_FORMAT

ORIGINAL_MODULE = "model"  # the original's model.py, imported as `model` by its scripts


def allowed_globals() -> list:
    """Everything an original convnet.pth or reward_model.pth may name, and nothing more."""
    from torchvision.models.resnet import BasicBlock, ResNet

    layers = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Sequential, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Linear]
    stand_ins = [(ThreeLayerConvNet, f"{ORIGINAL_MODULE}.ThreeLayerConvNet"), (ResidualBlock, f"{ORIGINAL_MODULE}.ResidualBlock")]
    return [*layers, ResNet, BasicBlock, *stand_ins]


def load_original(path: str | Path, expected: type) -> nn.Module:
    """An original pickled module of class `expected` (ThreeLayerConvNet or torchvision ResNet), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist; expected a file saved by the original code")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a global outside the allowlist, a truncated file, not a pickle ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{str(path)!r} was refused: it is not an original {expected.__name__} made only of allowed layers "
                        f"({reason}); nothing in it was run") from None
    if not isinstance(module, expected):
        raise UserError(f"{str(path)!r} holds a {type(module).__name__}; expected the original's {expected.__name__}")
    return module.eval()


def convert_predictor(path: str | Path) -> dict:
    """The original convnet.pth -> our predictor checkpoint (metadata the original lacks: None)."""
    from rcgdm.predictor import load_predictor_state

    original = load_original(path, ThreeLayerConvNet)
    channels = original.layer1.conv1.in_channels
    net = load_predictor_state(ThreeLayerConvNet(channels), original.state_dict(), path)
    unknown = dict.fromkeys(("latent_size", "model", "image_size", "label_mean", "label_std", "epochs", "val_loss"))
    return predictor_checkpoint(net, {"latent_channels": channels, **unknown, "noised": True, "converted_from": str(path)})


def convert_reward(path: str | Path) -> dict:
    """The original reward_model.pth (torchvision ResNet18, fc = Linear(512, 1)) -> our reward checkpoint."""
    from torchvision.models.resnet import ResNet

    from rcgdm.rewards.resnet18 import model_from_checkpoint

    original = load_original(path, ResNet)
    checkpoint = {"format": REWARD_FORMAT, "arch": REWARD_ARCH, "reward": "resnet18-random", "weights": None, "seed": None,
                  "converted_from": str(path), "state_dict": original.state_dict()}
    model_from_checkpoint(checkpoint, path)  # refuses anything but a ResNet18 with a Linear(512, 1) head
    return checkpoint


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(prog="python -m rcgdm.convert_original", description=__doc__.split("\n\n")[0])
    p.add_argument("convnet", help="the original's convnet.pth (pickled ThreeLayerConvNet)")
    p.add_argument("reward_model", help="the original's reward_model.pth (pickled ResNet18)")
    p.add_argument("--out_dir", required=True, help="where to write convnet.pth and reward_model.pth in this project's formats")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out_dir")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out_dir)
    outputs = [out_dir / "convnet.pth", out_dir / "reward_model.pth"]
    check_creatable(out_dir)
    refuse_inputs_as_outputs({"convnet": args.convnet, "reward_model": args.reward_model}, outputs)
    if not args.overwrite:
        refuse_existing(outputs, "use --overwrite to replace it, or another --out_dir")
    predictor, reward = convert_predictor(args.convnet), convert_reward(args.reward_model)
    writable_dir(out_dir)
    save_torch(predictor, outputs[0])
    save_torch(reward, outputs[1])
    print(f"wrote {outputs[0]} and {outputs[1]}")
    print("check: the original files carry no metadata, so the latent size, the label mean and std, the SD model and the "
          "ResNet's weights source are recorded as unknown; pass the model they were trained with to inference.py")


if __name__ == "__main__":
    run_main(main)
