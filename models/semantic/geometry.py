"""Pure, batched geometry of semantic alignment: affine and thin-plate-spline (TPS) maps, grids, flows.

Convention
----------
* Points are ``(x, y)``; *normalised* coordinates put the centres of the corner pixels at -1 and +1
  (``x_n = 2 x / (W - 1) - 1``), the convention of :mod:`models.geometry`; every ``grid_sample``
  call passes ``align_corners=True``.
* Every map here is a **backward** map from the *target* (the aligned output) to the *source*:
  ``warped_source(p) = source(f(p))``, as the product's pair matrices are.
* Affine: ``theta`` ``(B, 2, 3)`` with ``f(p) = theta[:, :, :2] p + theta[:, :, 2]`` (normalised);
  the identity is ``[[1, 0, 0], [0, 1, 0]]``.
* TPS: ``K = g * g`` control points ``ctrl`` ``(K, 2)`` on a regular grid of the *target* spanning
  ``[-1, 1]^2`` (x fastest, then y); the parameters are where they land in the *source*,
  ``dst`` ``(B, K, 2)``; the identity is ``dst = ctrl``. The map is the interpolating spline
  ``f(p) = a + A p + sum_i w_i U(|p - ctrl_i|)`` with ``U(r) = r^2 log r^2`` (``U(0) = 0``),
  ``f(ctrl_i) = dst_i``, ``sum_i w_i = 0`` and ``sum_i w_i ctrl_i = 0``: it reproduces an affine
  map exactly, and passes through its control points exactly.
* A *flow* is a dense backward map sampled at every target pixel: ``(B, H, W, 2)`` source positions
  (normalised or pixel, the name says which) for the target pixel ``(x, y) = (j, i)``.

Device and dtype follow the inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["identity_affine", "affine_points", "base_grid", "affine_grid", "tps_control_points", "tps_kernel",
           "tps_coefficients", "tps_points", "tps_grid", "sample", "pixel_from_norm_points",
           "norm_from_pixel_points", "flow_points"]


def identity_affine(batch: int, *, like: torch.Tensor) -> torch.Tensor:
    """``(batch, 2, 3)`` identity affine maps of ``like``'s dtype and device."""
    return torch.eye(2, 3, dtype=like.dtype, device=like.device).expand(batch, 2, 3).clone()


def affine_points(theta: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``theta`` ``(B, 2, 3)``, ``pts`` ``(B, N, 2)`` -> ``(B, N, 2)``: ``A p + t``."""
    return pts @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]


def base_grid(size: tuple[int, int], *, like: torch.Tensor) -> torch.Tensor:
    """``(H, W, 2)`` normalised ``(x, y)`` of every pixel centre of an ``(H, W)`` image."""
    H, W = size
    ys = torch.linspace(-1, 1, H, dtype=like.dtype, device=like.device) if H > 1 else like.new_zeros(1)
    xs = torch.linspace(-1, 1, W, dtype=like.dtype, device=like.device) if W > 1 else like.new_zeros(1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 2, 3)`` -> ``(B, H, W, 2)`` normalised source positions of the target's pixels."""
    B, (H, W) = theta.shape[0], size
    p = base_grid(size, like=theta).reshape(1, H * W, 2).expand(B, -1, -1)
    return affine_points(theta, p).reshape(B, H, W, 2)


def tps_control_points(g: int, *, like: torch.Tensor) -> torch.Tensor:
    """``(g * g, 2)`` control points on a regular ``g x g`` grid of ``[-1, 1]^2``, x fastest."""
    return base_grid((g, g), like=like).reshape(-1, 2)


def tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``U(|a_i - b_j|)`` for ``a`` ``(..., N, 2)``, ``b`` ``(..., K, 2)`` -> ``(..., N, K)``."""
    r2 = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)
    # r^2 log r^2, with the limit 0 at r = 0 (where the log would give nan gradients).
    return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-30)), torch.zeros_like(r2))


def tps_coefficients(ctrl: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The spline through ``ctrl`` ``(K, 2)`` -> ``dst`` ``(B, K, 2)``: ``(B, K + 3, 2)`` coefficients,
    the ``K`` kernel weights ``w`` then ``a``, and the rows of ``A`` for x and y."""
    K = ctrl.shape[0]
    P1 = torch.cat([torch.ones_like(ctrl[:, :1]), ctrl], dim=1)  # (K, 3)
    L = torch.zeros(K + 3, K + 3, dtype=ctrl.dtype, device=ctrl.device)
    L[:K, :K] = tps_kernel(ctrl, ctrl)
    L[:K, K:] = P1
    L[K:, :K] = P1.T
    rhs = torch.cat([dst, dst.new_zeros(dst.shape[0], 3, 2)], dim=1)  # (B, K + 3, 2)
    return torch.linalg.solve(L, rhs)


def tps_points(ctrl: torch.Tensor, dst: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """The TPS map of ``ctrl`` -> ``dst`` ``(B, K, 2)`` applied to ``pts`` ``(B, N, 2)`` -> ``(B, N, 2)``."""
    coef = tps_coefficients(ctrl, dst)  # (B, K + 3, 2)
    U = tps_kernel(pts, ctrl)  # (B, N, K)
    basis = torch.cat([U, torch.ones_like(pts[..., :1]), pts], dim=-1)  # (B, N, K + 3)
    return basis @ coef


def tps_grid(ctrl: torch.Tensor, dst: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, 2)`` normalised source positions of the target's pixels under the TPS map."""
    B, (H, W) = dst.shape[0], size
    p = base_grid(size, like=dst).reshape(1, H * W, 2).expand(B, -1, -1)
    return tps_points(ctrl, dst, p).reshape(B, H, W, 2)


def sample(image: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear ``image`` ``(B, C, Hs, Ws)`` at ``grid`` ``(B, H, W, 2)`` normalised -> ``(B, C, H, W)``."""
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=True)


def pixel_from_norm_points(pts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised ``(..., 2)`` -> pixels of an ``(H, W)`` image."""
    H, W = size
    scale = pts.new_tensor([(W - 1) / 2, (H - 1) / 2])
    return (pts + 1) * scale


def norm_from_pixel_points(pts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixels ``(..., 2)`` of an ``(H, W)`` image -> normalised."""
    H, W = size
    scale = pts.new_tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)])
    return pts * scale - 1


def flow_points(flow: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """A dense backward map ``flow`` ``(B, H, W, 2)`` read (bilinearly) at target points ``pts``
    ``(B, N, 2)``, both normalised -> ``(B, N, 2)`` source positions. Outside the target the
    flow is extended by its border values."""
    out = F.grid_sample(flow.permute(0, 3, 1, 2), pts[:, :, None, :].to(flow.dtype), mode="bilinear",
                        padding_mode="border", align_corners=True)  # (B, 2, N, 1)
    return out[..., 0].transpose(1, 2)
