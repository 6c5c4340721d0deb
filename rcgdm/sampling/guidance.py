"""The paper's reward guidance, for diffusion models of any prediction type and for flow-matching models.

The seed README adds to every denoising step

    grad_x log p_t(y | x) = -guidance * grad_x [ 1/2 || target - mu(x) ||^2 ]

and since eps(x_t) = -sqrt(1 - alpha_bar_t) * grad_x log p_t(x_t), conditioning on y shifts the
noise prediction by

    eps <- eps + sqrt(1 - alpha_bar_t) * guidance * grad_x [ 1/2 || target - mu(x_t) ||^2 ]

mu is the trained predictor, applied to the current noisy latent x_t; the UNet is never differentiated.

Other parametrizations (the scheduler config's `prediction_type`). With x_t = sqrt(a) x0 + sqrt(1-a) eps
(a = alpha_bar_t) and the model's output held at a fixed x_t:

- ``v_prediction``: v = sqrt(a) eps - sqrt(1-a) x0. Substituting x0 = (x_t - sqrt(1-a) eps) / sqrt(a):
  sqrt(a) v = a eps - sqrt(1-a) x_t + (1-a) eps = eps - sqrt(1-a) x_t, so eps = sqrt(1-a) x_t + sqrt(a) v.
  At fixed x_t, d eps = sqrt(a) d v: the paper's eps shift is a v shift of (eps shift) / sqrt(a).
- ``sample`` (the model predicts x0): eps = (x_t - sqrt(a) x0) / sqrt(1-a), so d eps = -sqrt(a) / sqrt(1-a) d x0:
  the eps shift is an x0 shift of -(eps shift) * sqrt(1-a) / sqrt(a).

Flow matching (SD3; rcgdm/sampling/families.py), ``flow_prediction``. Here x_t = (1 - sigma) x0 + sigma eps, and the
model predicts the velocity v = dx_t/dsigma = eps - x0 (diffusers' flow-matching schedulers step
x <- x + (sigma_next - sigma) v). The score of x_t is -E[eps | x_t] / sigma, so, as above, conditioning on y
shifts eps by

    eps <- eps + sigma * guidance * grad_x [ 1/2 || target - mu(x_t) ||^2 ]

(the noise's scale, sigma, in place of sqrt(1 - a)). Since x0 = x_t - sigma v, eps = x_t + (1 - sigma) v, so at
fixed x_t, d eps = (1 - sigma) d v: the eps shift is a velocity shift of (eps shift) / (1 - sigma). The x0 path
sees x0_hat = (x_t - sigma eps) / (1 - sigma), so its gradient w.r.t. x_t is the one w.r.t. x0_hat divided by
(1 - sigma). In one notation for both: x_t = s x0 + n eps with s = sqrt(a), n = sqrt(1 - a) (diffusion) or
s = 1 - sigma, n = sigma (flow); the code below is written in s and n.

Every type is guided through its equivalent eps (`as_eps`, used by the x0 gradient path too), and the
shift is added to the model's own output (`RewardGuidance.apply`), so the scheduler steps exactly as it would
with a model that had predicted the shifted eps. alpha_bar_t is the noise level the scheduler itself
sits at (rcgdm/sampling/schedulers.py: alphas_cumprod[t], or 1 / (1 + sigma^2) for sigma schedulers); for flow matching
the level is the scheduler's sigma itself.

Zero terminal SNR (alpha_bar_t = 0, the first step of schedules rescaled to zero SNR; sigma = 1 in flow matching,
where schedules start). Then x_t = eps exactly: x_t carries no information about x0, so y and x_t are independent,
p_t(y | x_t) = p(y), grad_x log p_t(y | x_t) = 0 and the eps shift is 0. The outputs that carry x0 still move:
at s = 0 a v model predicts -E[x0 | x_t] and a flow model x_t - E[x0 | x_t], and conditioning on y moves both by
-(E[x0 | y] - E[x0]) (0.99 in norm at a = 1 in the simulation's default world; rcgdm/simulation/theory.py). The
formulas above reach that value only as a limit, output shift = n g grad / s with a gradient that vanishes like s,
and only for a predictor that knows the noise level (E[y | x_t] depends on it): a level-blind predictor's gradient
does not vanish with s, so it has no limit there. Hence:

- a predictor that takes the level (`predictor.takes_level`, called as predictor(x, level)) is guided with the limit:
  the term at s = 0 is evaluated at the level where s = LIMIT_SIGNAL, which the tests check against the closed form;
- for any other predictor (the paper's ConvNet) the term is zero at that one step and the output is left as it is.

The strength `guidance` is a number, or a function of the noise level (the posterior strength 1 / Var(y | x_t),
rcgdm/sampling/posterior.py).

A predictor that also predicts its variance (rcgdm/predictor.py's CalibratedConvNet: (mu, log v) per image) can be
guided by its Gaussian likelihood itself (`likelihood=True`): the term is guidance * grad_x -log N(target; mu, v),
in place of guidance * grad_x 1/2 (target - mu)^2, so that guidance 1 is the posterior with the predictor's own
variance, the variance's gradient included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rcgdm.sampling.families import PREDICTION_TYPES


def reward_loss(predictor: nn.Module, x: torch.Tensor, target: float, level: torch.Tensor | None = None,
                likelihood: bool = False) -> torch.Tensor:
    """Each image's loss (B,) at x (B, C, h, w): 1/2 (target - mu(x))^2, or with likelihood=True (a predictor that also
    predicts log Var(y | x_t), `predicts_variance`, its second output column v) -log N(target; mu(x), v(x)) up to its
    constant, (target - mu)^2 / (2 v) + 1/2 log v. A predictor that takes the level (`takes_level`) is called as
    predictor(x, level); its first output column is mu."""
    out = predictor(x, level) if takes_level(predictor) else predictor(x)  # (B, 1), or (B, 2): mu, log v
    squared = (target - out[:, 0]).pow(2)
    return 0.5 * (squared * torch.exp(-out[:, 1]) + out[:, 1]) if likelihood else 0.5 * squared


def loss_and_gradient(predictor: nn.Module, x_t: torch.Tensor, target: float, batch_mean: bool = False,
                      level: torch.Tensor | None = None, likelihood: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(`reward_loss` per image (B,), its gradient w.r.t. x_t (B, C, h, w)), in float32 (float64 stays float64).

    Each image's term is its own (a sum over the batch). batch_mean=True divides the gradient by B, as the original
    code's `0.5 * MSELoss()(mu, target)` did: guidance g with batch_mean at batch size B == g / B without.
    """
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        x = x_t.detach().to(dtype).requires_grad_(True)
        loss = reward_loss(predictor, x, target, level, likelihood)
        (grad,) = torch.autograd.grad(loss.sum() / (x.shape[0] if batch_mean else 1), x)
    return loss.detach(), grad


def reward_gradient(predictor: nn.Module, x_t: torch.Tensor, target: float, batch_mean: bool = False,
                    level: torch.Tensor | None = None, likelihood: bool = False) -> torch.Tensor:
    """grad_x `reward_loss` for each image of x_t (B, C, h, w): grad_x 1/2 ||target - mu(x)||^2, or with likelihood=True
    grad_x -log N(target; mu(x), v(x)), the Gaussian likelihood's own gradient (with v's, which the paper's term lacks).
    See `loss_and_gradient`."""
    return loss_and_gradient(predictor, x_t, target, batch_mean, level, likelihood)[1]


def guidance_label(guidance: float | str) -> str:
    """A strength as text: "150", "auto", "posterior"."""
    return guidance if isinstance(guidance, str) else f"{guidance:g}"


def guidance_order(guidance: float | str) -> tuple:
    """A sort key: numbers in order, then "auto", then "posterior"."""
    return (1, guidance) if isinstance(guidance, str) else (0, guidance)


GRAD_PATHS = ("xt", "x0")
LIMIT_SIGNAL = 1e-6  # s at which a level-aware predictor's term stands for its limit at s = 0 (module docstring)


def takes_level(predictor: nn.Module) -> bool:
    """Whether `predictor` is called with the noise level as well (predictor(x, level))."""
    return getattr(predictor, "takes_level", False) is True


def predicts_variance(predictor: nn.Module) -> bool:
    """Whether `predictor` outputs log Var(y | x_t) beside the mean ((B, 2): mu, log v)."""
    return getattr(predictor, "predicts_variance", False) is True


def signal_and_noise(level: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, n) of x_t = s x0 + n eps at a noise `level`: alpha_bar_t, or sigma_t for flow_prediction."""
    if prediction_type == "flow_prediction":
        return 1 - level, level
    return level.sqrt(), (1 - level).sqrt()


def as_eps(output: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor, n: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The eps equivalent to a model output of `prediction_type` at x_t = s x0 + n eps (s, n: tensors)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return n * x_t + s * output
    if prediction_type == "sample":
        return (x_t - s * output) / n
    if prediction_type == "flow_prediction":
        return x_t + s * output
    raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def as_x0(output: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor, n: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The x0 estimate of a model output of `prediction_type` at x_t = s x0 + n eps (an epsilon output needs s > 0)."""
    if prediction_type == "epsilon":
        return (x_t - n * output) / s
    if prediction_type == "v_prediction":
        return s * x_t - n * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow_prediction":
        return x_t - n * output
    raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def output_per_eps(s: torch.Tensor, n: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """d output / d eps at fixed x_t: how an eps shift shows in the model's own output."""
    return {"epsilon": torch.ones_like(s), "v_prediction": 1 / s, "sample": -n / s, "flow_prediction": 1 / s}[prediction_type]


def eps_shift(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    s: torch.Tensor,
    n: torch.Tensor,
    predictor: nn.Module,
    target: float,
    guidance: float,
    batch_mean: bool = False,
    grad_path: str = "xt",
    level: torch.Tensor | None = None,
    likelihood: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n * guidance * grad_{x_t} 1/2 ||target - mu(.)||^2 at x_t = s x0 + n eps (s, n: tensors of x_t's float dtype),
    each image's loss (B,) where mu looked).

    grad_path "xt" (the paper): mu sees the noisy latent x_t. "x0": mu sees the denoised estimate
    x0_hat = (x_t - n eps) / s with eps held fixed (the UNet is still not differentiated), so the gradient
    w.r.t. x_t is the one w.r.t. x0_hat divided by s.
    """
    if grad_path == "x0":
        x0_hat = (x_t.to(s.dtype) - n * eps.detach().to(s.dtype)) / s
        loss, grad = loss_and_gradient(predictor, x0_hat, target, batch_mean, level, likelihood)
        grad = grad / s
    else:
        loss, grad = loss_and_gradient(predictor, x_t, target, batch_mean, level, likelihood)
    return n * guidance * grad, loss


def _level(level: torch.Tensor | float, x_t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    return torch.as_tensor(level, dtype=dtype, device=x_t.device)


def off_zero_signal(level: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """`level`, or at no signal (alpha_bar = 0, sigma = 1) the level where s = LIMIT_SIGNAL."""
    if prediction_type == "flow_prediction":
        return torch.where(level >= 1, torch.full_like(level, 1 - LIMIT_SIGNAL), level)
    return torch.where(level <= 0, torch.full_like(level, LIMIT_SIGNAL**2), level)


@dataclass(frozen=True)
class RewardGuidance:
    """Steer sampling toward predictor(x) == target with strength `guidance` (the paper's `guidance`): a number, or a
    function of the noise level (a level tensor -> a strength tensor), such as the posterior strength.

    batch_mean=True divides each image's term by the batch size, as the original code's mean loss did;
    grad_path "x0" lets the predictor see the denoised estimate instead of x_t (see the module docstring).
    likelihood=True (a predictor that `predicts_variance`): the term is `guidance` times the gradient of
    log N(target; mu, v) itself, so guidance 1 is the posterior with the predictor's own variance."""

    predictor: nn.Module
    target: float
    guidance: float | Callable[[torch.Tensor], torch.Tensor]
    batch_mean: bool = False
    grad_path: str = "xt"
    likelihood: bool = False

    def __post_init__(self) -> None:
        if self.likelihood and not predicts_variance(self.predictor):
            raise ValueError("likelihood=True needs a predictor that predicts its variance (predicts_variance)")

    def apply(self, output: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor | float,
              prediction_type: str) -> torch.Tensor:
        """A model output (B, C, h, w) of `prediction_type` at x_t, shifted as the paper's eps would be, in the output's
        dtype. `level` is alpha_bar_t, or sigma_t for flow_prediction. No signal left (alpha_bar_t = 0, sigma_t = 1)
        leaves the output as it is, unless the predictor takes the level (see the module docstring)."""
        return self.guided(output, x_t, level, prediction_type)[0]

    def guided(self, output: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor | float,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(`apply`'s shifted output, each image's energy (B,): the strength times `reward_loss` where mu looked, whose
        gradient the shift follows; 0 where the output is left as it is). exp(-energy) is the likelihood of y = target
        that the term steers by (rcgdm/sampling/particles.py weighs particles with it)."""
        shift, energy = self.shift(output, x_t, level, prediction_type)
        return output + shift, energy

    def shift(self, output: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor | float,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(What `apply` adds to `output`, in its dtype, the energy of `guided`). On grad_path "xt" it depends on x_t and
        the level alone, so that outputs combined affinely (classifier-free guidance) each take the same shift
        (rcgdm/steering.py)."""
        level = _level(level, x_t)
        if takes_level(self.predictor):
            level = off_zero_signal(level, prediction_type)
        s, n = signal_and_noise(level, prediction_type)
        noisy = s > 0  # a tensor test, not a Python one: reading a value on the GPU would wait for it at every step
        s, n = torch.where(noisy, s, torch.ones_like(s)), torch.where(noisy, n, torch.zeros_like(n))  # finite; dropped below
        eps = as_eps(output.to(s.dtype), x_t.to(s.dtype), s, n, prediction_type)
        strength = self.strength(level)
        shift, loss = eps_shift(eps, x_t, s, n, self.predictor, self.target, strength, self.batch_mean, self.grad_path,
                                level, self.likelihood)
        shift = shift * output_per_eps(s, n, prediction_type)
        energy = torch.where(noisy, strength * loss, torch.zeros_like(loss))
        return torch.where(noisy, shift, torch.zeros_like(shift)).to(output.dtype), energy

    def strength(self, level: torch.Tensor) -> torch.Tensor | float:
        """The strength at a noise `level` (a tensor)."""
        return self.guidance(level) if callable(self.guidance) else self.guidance

    def energy(self, x: torch.Tensor, level: float) -> torch.Tensor:
        """Each image's energy (B,) at x (B, C, h, w) at a noise `level` with signal (a clean level, say), where the
        predictor sees x itself: the strength times `reward_loss`."""
        level = _level(level, x)
        with torch.no_grad():
            loss = reward_loss(self.predictor, x.to(level.dtype), self.target, level, self.likelihood)
        return self.strength(level) * loss
