"""Small pure image operations shared by the core. Batched, ``(B, C, H, W)``;
device and dtype follow the input."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["blur", "blur_radius", "background", "gauss_kernel"]


def gauss_kernel(sigma: float, like: torch.Tensor) -> torch.Tensor:
    """The normalised 1-D Gaussian of :func:`blur`, ``(2r + 1,)`` with ``r = max(1, ceil(3 sigma))``."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=like.dtype, device=like.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding, ``(B, C, H, W)`` -> same. ``sigma`` in pixels."""
    if sigma <= 0.05:
        return x
    k = gauss_kernel(sigma, x)
    r = k.numel() // 2
    C = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=C)


def blur_radius(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """:func:`blur` with the width given as a tensor and a fixed kernel radius, ``(B, C, H, W)`` -> same.

    The kernel's shape never changes, only its weights, so one captured CUDA graph serves the
    whole coarse-to-fine schedule. ``sigma`` (pixels, 0-d) near 0 gives a unit impulse: no blur.
    """
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).clamp_min(1e-2)) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kx, groups=C)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), ky, groups=C)


def background(x: torch.Tensor) -> torch.Tensor:
    """Border median per image and channel, ``(B, C, 1, 1)``: the background estimate
    used for padding (samples from outside an image take this value)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    return border.median(dim=-1).values[..., None, None]
