"""The reward predictor mu(x): a 3-layer residual ConvNet on (noisy) SD VAE latents.

Checkpoint format (``convnet.pth``), loadable with ``torch.load(weights_only=True)``::

    {"format": "rcgdm.predictor/1", "arch": "ThreeLayerConvNet", "family": "sd", "latent_channels": 4,
     "latent_size": [64, 64], "image_size": int, "model": str, "noised": bool,
     "labels_sha256": str, "reward_model_sha256": str | None, "label_mean": float, "label_std": float,
     "epochs": int, "val_loss": float | None, "reference_latents": float16 (K, C, h, w),
     "state_dict": {...}}

`arch` is the paper's ThreeLayerConvNet (mu(x_t), level-blind; `posterior_levels` and `posterior_variances` record
its errors by level, rcgdm/sampling/posterior.py) or CalibratedConvNet (told the level, and predicting log Var(y | x_t) beside
mu: `--guidance posterior` then follows its own Gaussian likelihood; train.py predictor="calibrated").

Inference relies on `family` (sd, sdxl, sd3: rcgdm/sampling/families.py; absent in older checkpoints, which are all sd),
`latent_channels` and `latent_size` (the latents it guides must match), `noised`
(True: trained on noisy latents, for grad_path xt; False: clean ones, for x0), and `model` and
`reward_model_sha256` (the predictor belongs to that model's VAE and that reward model's labels).

`reference_latents` holds up to 512 of the training latents (clean), a seeded sample: inference
measures how far generated latents drift from them (rcgdm.evaluate.distribution_shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rcgdm.cli import InputError, finite32
from rcgdm.files.checkpoint import check_finite_state, load_checkpoint, plain_metadata
from rcgdm.files.provenance import sha256_file
from rcgdm.sampling.families import FAMILIES
from rcgdm.sampling.guidance import RewardGuidance, predicts_variance, signal_and_noise
from rcgdm.sampling.posterior import POSTERIOR, PosteriorStrength, curve_problem

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

    @property
    def latent_channels(self) -> int:
        return self.layer1.conv1.in_channels


class CalibratedConvNet(ThreeLayerConvNet):
    """The paper's ConvNet told the noise level and predicting its own uncertainty: latents x_t (B, C, H, W) at a
    level (alpha_bar, or sigma for a flow family: a number, a 0-dim tensor or (B,)) -> (B, 2), mu(x_t, t) and
    log Var(y | x_t).

    It reads s x_t, the latent times its signal share s (sqrt(alpha_bar), or 1 - sigma), and the level as one more
    input channel. As s -> 0, x_t carries nothing about y, and the net's gradient in x_t vanishes like s, as the
    exact E[y | x_t]'s does: the guidance term's limit at no signal (rcgdm/sampling/guidance.py) is then finite, where a
    gradient that stayed would be divided by s. Without a level (scoring finished images) the inputs are clean."""

    takes_level = True
    predicts_variance = True

    def __init__(self, in_channels: int = 4, flow: bool = False) -> None:
        super().__init__(in_channels + 1)
        self.fc = nn.Linear(256, 2)
        self.flow = flow

    @property
    def clean_level(self) -> float:
        return 0.0 if self.flow else 1.0

    def forward(self, x: torch.Tensor, level: torch.Tensor | float | None = None) -> torch.Tensor:
        level = torch.as_tensor(self.clean_level if level is None else level, dtype=x.dtype, device=x.device)
        level = level.reshape(-1, 1, 1, 1)
        signal = signal_and_noise(level, "flow_prediction" if self.flow else "epsilon")[0]
        return super().forward(torch.cat([signal * x, level.expand(len(x), 1, *x.shape[2:])], 1))

    @property
    def latent_channels(self) -> int:
        return self.layer1.conv1.in_channels - 1


ARCHES = {ARCH: ThreeLayerConvNet, "CalibratedConvNet": CalibratedConvNet}


def make_predictor(arch: str, latent_channels: int, family: str) -> ThreeLayerConvNet:
    """A fresh net of `arch` for latents of `latent_channels` channels of a `family` (rcgdm/sampling/families.py)."""
    if arch == ARCH:
        return ThreeLayerConvNet(latent_channels)
    return CalibratedConvNet(latent_channels, flow=FAMILIES[family].flow)


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
    return {"format": FORMAT, "arch": type(model).__name__, **meta, **extra, "state_dict": model.state_dict()}


def load_predictor_state(model: ThreeLayerConvNet, state_dict: dict, path: str | Path) -> ThreeLayerConvNet:
    """`model` with `state_dict` loaded (either naming: ours, earlier ones, the original's), checked finite, in eval mode."""
    try:
        model.load_state_dict(current_names(state_dict))
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise InputError("predictor", f"{str(path)!r} does not match a {type(model).__name__} ({reason})") from None
    check_finite_state(model.state_dict(), path, "predictor")
    return model.eval()


@dataclass(frozen=True)
class TrainedPredictor:
    """A predictor checkpoint, read once: the net (eval mode), what train.py recorded about it, and its training
    latents. The checks below compare that record with how a run means to use the net."""

    net: ThreeLayerConvNet
    meta: dict
    reference: torch.Tensor | None  # up to 512 clean training latents (K, C, h, w) float32; None in older checkpoints
    path: str

    def check_family(self, family: str) -> None:
        """The net must come from a model of this family: latents of another family's VAE, noised another way, are
        another input (even at the same channel count, as SD and SDXL)."""
        trained = self.meta.get("family", "sd")
        if trained != FAMILIES[family].latent_space:
            label = " or ".join(f.label for f in FAMILIES.values() if f.latent_space == trained) or repr(trained)
            raise InputError("predictor", f"{self.path!r} was trained on {label} latents; the model is "
                                          f"{FAMILIES[family].label}; expected one train.py trained on this model")

    def check_latent_channels(self, latent_channels: int) -> None:
        """The net must take the latents of the model's VAE (`latent_channels` channels)."""
        channels = self.net.latent_channels
        if channels != latent_channels:
            raise InputError("predictor", f"{self.path!r} was trained on {channels}-channel latents; the model's VAE makes "
                                          f"{latent_channels}")

    def check_grad_path(self, grad_path: str) -> None:
        """A net trained on noisy latents serves grad_path xt; one trained on clean latents (noise=False), x0."""
        noised = self.meta.get("noised", True)
        if noised != (grad_path == "xt"):
            trained = "noisy latents (train.py noise=True)" if noised else "clean latents (train.py noise=False)"
            raise InputError("predictor", f"{self.path!r} was trained on {trained}; it serves --grad_path "
                                          f"{'xt' if noised else 'x0'}, not {grad_path}")

    def check_latent_size(self, sampled: tuple[int, int], vae_scale_factor: int) -> None:
        """The net must have been trained on latents of the size sampled (h, w): its average pool accepts any size, but
        its features were learned at one scale, so at another its gradient would steer with no guarantee (README)."""
        trained = self.meta.get("latent_size")
        if trained is not None and list(trained) != list(sampled):
            h, w = (n * vae_scale_factor for n in trained)
            raise InputError("predictor", f"{self.path!r} was trained on {trained[0]}x{trained[1]} latents ({h}x{w} images); "
                                          f"this run samples {sampled[0]}x{sampled[1]}; expected --height {h} --width {w}, or "
                                          "a predictor trained at that size (train.py image_size)")

    def posterior_strength(self) -> PosteriorStrength | None:
        """How guidance "posterior" steers: None for a calibrated net (its own Gaussian likelihood, strength 1), else
        the strength 1 / sigma_t^2 from the curve train.py recorded (rcgdm/sampling/posterior.py); InputError without one."""
        if predicts_variance(self.net):
            return None
        levels, variances = self.meta.get("posterior_levels"), self.meta.get("posterior_variances")
        if levels is None or variances is None:
            raise InputError("guidance", f"posterior needs the error curve that train.py records; {self.path!r} has none; "
                                         "expected a predictor trained by this version with val_fraction > 0 and noise=True "
                                         "(train it again), or a number or auto")
        return PosteriorStrength(tuple(levels), tuple(variances))

    def steer(self, target: float, guidance: float | str, batch_mean: bool = False, grad_path: str = "xt") -> RewardGuidance:
        """The guidance term toward `target`: at a number's strength (on the mean alone), or for "posterior" at
        `posterior_strength`, a calibrated net by its likelihood."""
        if guidance != POSTERIOR:
            return RewardGuidance(self.net, target, guidance, batch_mean, grad_path)
        strength = self.posterior_strength()
        if strength is None:
            return RewardGuidance(self.net, target, 1.0, batch_mean, grad_path, likelihood=True)
        return RewardGuidance(self.net, target, strength, batch_mean, grad_path)

    def check_trained_for(self, model: str, reward_model: str | Path | None = None) -> None:
        """The net must come from this model's VAE latents and, if given, labels of this reward model (its file)."""
        recorded = self.meta.get("reward_model_sha256")
        if recorded is not None and reward_model is not None and recorded != sha256_file(reward_model):
            raise InputError("predictor", f"{self.path!r} was trained on labels of another reward model than --reward_model "
                                          f"{str(reward_model)!r}; expected the pair written together (or "
                                          "--ignore_provenance)")
        trained_on = self.meta.get("model")
        if trained_on is not None and trained_on != model:
            raise InputError("predictor", f"{self.path!r} was trained on --model {trained_on!r}'s latents, not {model!r}; "
                                          "expected the same model (or --ignore_provenance)")


MAX_CHANNELS, MAX_LATENT = 1024, 4096


def _integer(low: int, high: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number(low: float = -math.inf):
    return lambda v: finite32(v) and v >= low


FIELDS = {  # what each metadata field must hold when present (older checkpoints lack some): (check, expected)
    "arch": (lambda v: isinstance(v, str) and v in ARCHES, " or ".join(map(repr, ARCHES))),
    "family": (lambda v: isinstance(v, str) and v in FAMILIES, f"one of {', '.join(FAMILIES)}"),
    "latent_channels": (_integer(1, MAX_CHANNELS), f"an integer from 1 to {MAX_CHANNELS}"),
    "latent_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_integer(1, MAX_LATENT), v)),
                    f"[h, w], integers from 1 to {MAX_LATENT}"),
    "image_size": (_integer(1, 8 * MAX_LATENT), f"an integer from 1 to {8 * MAX_LATENT}"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "noised": (lambda v: isinstance(v, bool), "true or false"),
    "labels_sha256": (lambda v: isinstance(v, str), "a string"),
    "reward_model_sha256": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "label_mean": (_number(), "a finite number"),
    "label_std": (_number(0), "a finite number >= 0"),
    "epochs": (_integer(1, 2**31), "an integer >= 1"),
    "val_loss": (lambda v: v is None or _number(0)(v), "a finite number >= 0, or None"),
    "posterior_levels": (lambda v: v is None or isinstance(v, list), "a list of numbers, or None"),
    "posterior_variances": (lambda v: v is None or isinstance(v, list), "a list of numbers, or None"),
}


UNKNOWN_ALLOWED = ("latent_size", "model", "image_size", "label_mean", "label_std", "epochs")  # None: a converted original


def check_fields(checkpoint: dict, path: str | Path) -> None:
    """InputError naming the first metadata field that does not hold what train.py writes (FIELDS), or None where a
    checkpoint converted from the original code records it as unknown (rcgdm/convert_original.py)."""
    if "latent_channels" not in checkpoint:
        raise InputError("predictor", f"{str(path)!r}: field 'latent_channels' is missing; expected a checkpoint of train.py")
    for field, (ok, expected) in FIELDS.items():
        unknown = field in UNKNOWN_ALLOWED and checkpoint.get(field, 0) is None
        if field in checkpoint and not unknown and not ok(checkpoint[field]):
            value = checkpoint[field]
            plain = isinstance(value, str | int | float | bool | list | type(None)) and len(repr(value)) <= 60
            shown = f"is {value!r}" if plain else f"holds a {type(value).__name__}"
            raise InputError("predictor", f"{str(path)!r}: field {field!r} {shown}; expected {expected}")
    curve = checkpoint.get("posterior_levels"), checkpoint.get("posterior_variances")
    if curve != (None, None) and (problem := curve_problem(*curve)):
        raise InputError("predictor", f"{str(path)!r}: fields 'posterior_levels' and 'posterior_variances' do not hold a "
                                      f"curve; expected {problem}")


def load_predictor(path: str | Path, family: str | None = None, latent_channels: int | None = None) -> TrainedPredictor:
    """Read a predictor checkpoint (train.py's convnet.pth) once, every field checked before anything else is done
    with it; checks the family and latent channels if given."""
    checkpoint = load_checkpoint(path, FORMAT)
    check_fields(checkpoint, path)
    arch, trained = checkpoint.get("arch", ARCH), checkpoint.get("family", "sd")
    net = load_predictor_state(make_predictor(arch, checkpoint["latent_channels"], trained), checkpoint["state_dict"], path)
    meta = plain_metadata(checkpoint, path, skip=("state_dict", "reference_latents"))
    predictor = TrainedPredictor(net, meta, _reference_latents(checkpoint, path), str(path))
    if family is not None:
        predictor.check_family(family)
    if latent_channels is not None:
        predictor.check_latent_channels(latent_channels)
    return predictor


def _reference_latents(checkpoint: dict, path: str | Path) -> torch.Tensor | None:
    """The stored training latents, checked before any arithmetic: a small file can describe a huge tensor (a
    stride-0 view), and float() or isfinite() would allocate all of it."""
    reference = checkpoint.get("reference_latents")
    if reference is None:
        return None
    size = checkpoint.get("latent_size")
    expected = f"(K, {checkpoint['latent_channels']}, h, w) with 1 <= K <= {REFERENCE_LATENTS}" + (
        f", h x w = {size[0]} x {size[1]}" if size else "")
    fits = (isinstance(reference, torch.Tensor) and reference.dtype in (torch.float16, torch.float32) and reference.ndim == 4
            and 1 <= len(reference) <= REFERENCE_LATENTS and reference.shape[1] == checkpoint["latent_channels"]
            and (size is None or list(reference.shape[2:]) == list(size)) and reference.is_contiguous())
    if not fits or not torch.isfinite(reference).all():
        raise InputError("predictor", f"{str(path)!r}: field 'reference_latents' is not a finite, contiguous float tensor "
                                      f"{expected}")
    return reference.float()
