"""Random affine + thin-plate-spline warps with known dense ground truth, and appearance changes.

A warp is the backward map target -> source ``p -> theta(tps(p))`` (:mod:`models.semantic.geometry`):
``target(p) = source(theta(tps(p)))``, so a target keypoint ``p`` shows what the source shows at
``theta(tps(p))``. Used by the training's self-supervised stage and by ``bench/semantic.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import geometry as SG

__all__ = ["WarpSpec", "SyntheticWarp", "random_warps", "warp_images", "appearance"]


@dataclass(frozen=True)
class WarpSpec:
    """Ranges of the random warps (normalised units; angles in degrees)."""

    rotation: float = 15.0
    scale: float = 0.15  # log-uniform in [1 - scale, 1 + scale]
    aspect: float = 0.1
    shear: float = 0.1
    translation: float = 0.1
    tps_sigma: float = 0.08  # std of the control points' displacements
    tps_grid: int = 3


@dataclass
class SyntheticWarp:
    theta: torch.Tensor  # (B, 2, 3)
    tps_dst: torch.Tensor  # (B, K, 2), K = tps_grid ** 2
    tps_grid: int

    def map_points(self, pts: torch.Tensor) -> torch.Tensor:
        """Target points ``(B, N, 2)`` normalised -> source points."""
        ctrl = SG.tps_control_points(self.tps_grid, like=pts)
        return SG.affine_points(self.theta.to(pts), SG.tps_points(ctrl, self.tps_dst.to(pts), pts))

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        B, (H, W) = self.theta.shape[0], size
        p = SG.base_grid(size, like=self.theta).reshape(1, H * W, 2).expand(B, -1, -1)
        return self.map_points(p).reshape(B, H, W, 2)


def random_warps(batch: int, spec: WarpSpec = WarpSpec(), *, like: torch.Tensor,
                 generator: torch.Generator | None = None) -> SyntheticWarp:
    """``batch`` random warps of ``like``'s dtype and device (drawn on the CPU with ``generator``)."""

    def u(*shape):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1)

    a = u(batch) * math.radians(spec.rotation)
    s = torch.exp(u(batch) * math.log1p(spec.scale))
    r = torch.exp(u(batch) * math.log1p(spec.aspect))
    sh = u(batch) * spec.shear
    c, si = torch.cos(a), torch.sin(a)
    R = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)  # (B, 2, 2)
    S = torch.stack([torch.stack([s * r, s * sh], -1), torch.stack([torch.zeros_like(s), s / r], -1)], -2)
    A = R @ S
    t = u(batch, 2) * spec.translation
    theta = torch.cat([A, t[..., None]], dim=2)
    ctrl = SG.tps_control_points(spec.tps_grid, like=theta)
    dst = ctrl[None] + torch.randn(batch, ctrl.shape[0], 2, generator=generator, dtype=torch.float64) * spec.tps_sigma
    return SyntheticWarp(theta.to(like), dst.to(like), spec.tps_grid)


def warp_images(images: torch.Tensor, warp: SyntheticWarp) -> torch.Tensor:
    """``(B, C, H, W)`` sources -> the targets ``source(warp(p))``; outside the source is 0."""
    return SG.sample(images, warp.grid(tuple(images.shape[-2:])).to(images.dtype))


def appearance(images: torch.Tensor, *, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random contrast, brightness, gamma and noise per image, ``(B, C, H, W)`` in [0, 1] -> same."""
    B = images.shape[0]

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(B, 1, 1, 1, generator=generator)).to(images)

    x = images.clamp(0, 1) ** torch.exp(u(-0.4, 0.4) * strength)
    x = 0.5 + (x - 0.5) * (1 + u(-0.3, 0.3) * strength) + u(-0.15, 0.15) * strength
    noise = torch.randn(images.shape, generator=generator).to(images) * 0.04 * strength
    return (x + noise).clamp(0, 1)
