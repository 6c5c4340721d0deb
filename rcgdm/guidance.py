"""The paper's reward guidance, for an epsilon-predicting diffusion model.

The seed README adds to every denoising step

    grad_x log p_t(y | x) = -guidance * grad_x [ 1/2 || target - mu(x) ||^2 ]

and since eps(x_t) = -sqrt(1 - alpha_bar_t) * grad_x log p_t(x_t), conditioning on y shifts the
noise prediction by

    eps <- eps + sqrt(1 - alpha_bar_t) * guidance * grad_x [ 1/2 || target - mu(x_t) ||^2 ]

mu is the trained predictor, applied to the current noisy latent x_t; the UNet is never differentiated.
"""

from __future__ import annotations

import torch
from torch import nn


def reward_gradient(predictor: nn.Module, x_t: torch.Tensor, target: float, batch_mean: bool = False) -> torch.Tensor:
    """grad_x 1/2 ||target - mu(x)||^2 for each image of x_t (B, C, h, w), in float32 (float64 stays float64).

    Each image's term is its own (a sum over the batch). batch_mean=True divides by B, as the original
    code's `0.5 * MSELoss()(mu, target)` did: guidance g with batch_mean at batch size B == g / B without.
    """
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        x = x_t.detach().to(dtype).requires_grad_(True)
        mu = predictor(x)  # (B, 1)
        loss = 0.5 * (target - mu).pow(2).sum()
        if batch_mean:
            loss = loss / x.shape[0]
        (grad,) = torch.autograd.grad(loss, x)
    return grad


GRAD_PATHS = ("xt", "x0")


def guide_eps(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    predictor: nn.Module,
    target: float,
    guidance: float,
    batch_mean: bool = False,
    grad_path: str = "xt",
) -> torch.Tensor:
    """eps + sqrt(1 - alpha_bar_t) * guidance * grad_{x_t} 1/2 ||target - mu(.)||^2, in eps's dtype.

    grad_path "xt" (the paper): mu sees the noisy latent x_t. "x0": mu sees the denoised estimate
    x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a) with eps held fixed (the UNet is still not
    differentiated), so the gradient w.r.t. x_t is the one w.r.t. x0_hat divided by sqrt(a).
    """
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    a = torch.as_tensor(alpha_bar_t, dtype=dtype, device=x_t.device)
    if grad_path == "x0":
        x0_hat = (x_t.to(dtype) - (1 - a).sqrt() * eps.detach().to(dtype)) / a.sqrt()
        grad = reward_gradient(predictor, x0_hat, target, batch_mean) / a.sqrt()
    else:
        grad = reward_gradient(predictor, x_t, target, batch_mean)
    return eps + ((1 - a).sqrt() * guidance * grad).to(eps.dtype)
