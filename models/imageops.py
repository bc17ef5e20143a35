"""Small pure image operations shared by the core. Batched, ``(B, C, H, W)``;
device and dtype follow the input."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["blur", "background"]


def _gauss_kernel(sigma: float, like: torch.Tensor) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=like.dtype, device=like.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding, ``(B, C, H, W)`` -> same. ``sigma`` in pixels."""
    if sigma <= 0.05:
        return x
    k = _gauss_kernel(sigma, x)
    r = k.numel() // 2
    C = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=C)


def background(x: torch.Tensor) -> torch.Tensor:
    """Border median per image and channel, ``(B, C, 1, 1)``: the background estimate
    used for padding (samples from outside an image take this value)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    return border.median(dim=-1).values[..., None, None]
