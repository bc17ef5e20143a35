"""Pure, batched dense geometry for :mod:`models.dense`: thin-plate splines, dense coordinate maps,
point sampling, and the inverse of a smooth warp.

Convention (the one of :mod:`models.geometry`): points are ``(x, y)``; *normalised* coordinates
put the centres of the corner pixels at -1 and +1 (``align_corners=True`` at every
``grid_sample`` call, passed explicitly). A *coordinate map* ``(B, H, W, 2)`` gives, for each
pixel of an image, a point of another frame: ``canon_from_image`` maps an image pixel to the
canonical grid; ``template_from_image`` (the synthetic collections' ground truth) maps it to the
template. A map is the same thing as ``grid_sample``'s grid, so sampling a frame's content at a
map resamples that content into the image's pixels.

Device and dtype follow the inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "identity_map",
    "tps_kernel",
    "tps_fit",
    "tps_apply",
    "affine_apply",
    "warp_points",
    "warp_map",
    "sample_map",
    "sample_points",
    "invert_points",
    "pixel_from_norm",
    "norm_from_pixel",
]


def identity_map(height: int, width: int, *, like: torch.Tensor) -> torch.Tensor:
    """``(1, H, W, 2)`` normalised coordinates of every pixel centre (x first)."""
    ys = torch.linspace(-1, 1, height, dtype=like.dtype, device=like.device)
    xs = torch.linspace(-1, 1, width, dtype=like.dtype, device=like.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def pixel_from_norm(pts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised -> pixel coordinates, ``(..., 2)``."""
    s = pts.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    return (pts + 1) * s


def norm_from_pixel(pts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel -> normalised coordinates, ``(..., 2)``."""
    s = pts.new_tensor([2.0 / (width - 1), 2.0 / (height - 1)])
    return pts * s - 1


def tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The thin-plate radial basis ``U(r) = r^2 log r^2`` between point sets, ``(B, M, 2), (B, K, 2) ->
    (B, M, K)``; ``U(0) = 0``."""
    r2 = (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)
    return r2 * torch.log(r2.clamp_min(1e-20))


def tps_fit(ctrl: torch.Tensor, target: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """Thin-plate spline through control points: ``f(ctrl[k]) = target[k]`` exactly (``reg = 0``).

    ``f(p) = a0 + A p + sum_k w_k U(|p - ctrl_k|)`` with ``sum_k w_k = 0`` and ``sum_k w_k ctrl_k = 0``
    (so an affine ``target`` gives ``w = 0``: the spline is that affine map).

    Args:
        ctrl: ``(B, K, 2)`` control points.
        target: ``(B, K, 2)`` where they go.
        reg: ridge on the kernel (smoothing spline); 0 interpolates.
    Returns:
        ``(B, K + 3, 2)``: the ``K`` radial weights, then the affine part's rows ``[a0; A^T]``.
    """
    B, K, _ = ctrl.shape
    Kmat = tps_kernel(ctrl, ctrl) + reg * torch.eye(K, dtype=ctrl.dtype, device=ctrl.device)
    P = torch.cat([torch.ones_like(ctrl[..., :1]), ctrl], dim=-1)  # (B, K, 3)
    top = torch.cat([Kmat, P], dim=2)  # (B, K, K + 3)
    bottom = torch.cat([P.transpose(1, 2), ctrl.new_zeros(B, 3, 3)], dim=2)  # (B, 3, K + 3)
    L = torch.cat([top, bottom], dim=1)  # (B, K + 3, K + 3)
    rhs = torch.cat([target, target.new_zeros(B, 3, 2)], dim=1)
    return torch.linalg.solve(L, rhs)


def tps_apply(ctrl: torch.Tensor, params: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Evaluate :func:`tps_fit`'s spline at points, ``(B, K, 2), (B, K + 3, 2), (B, M, 2) -> (B, M, 2)``."""
    K = ctrl.shape[1]
    P = torch.cat([torch.ones_like(pts[..., :1]), pts], dim=-1)  # (B, M, 3)
    return tps_kernel(pts, ctrl) @ params[:, :K] + P @ params[:, K:]


def affine_apply(A: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` affine maps applied to ``(B, M, 2)`` points."""
    return pts @ A[:, :, :2].transpose(1, 2) + A[:, :, 2].unsqueeze(1)


def warp_points(A: torch.Tensor, ctrl: torch.Tensor, params: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """The synthetic warp ``p -> A(tps(p))``: a thin-plate spline, then an affine map.
    ``(B, 2, 3), (B, K, 2), (B, K + 3, 2), (B, M, 2) -> (B, M, 2)``."""
    return affine_apply(A, tps_apply(ctrl, params, pts))


def warp_map(A: torch.Tensor, ctrl: torch.Tensor, params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`warp_points` at every pixel centre: a ``(B, H, W, 2)`` coordinate map."""
    B = A.shape[0]
    g = identity_map(height, width, like=A).reshape(1, -1, 2).expand(B, -1, -1)
    return warp_points(A, ctrl, params, g).reshape(B, height, width, 2)


def sample_map(image: torch.Tensor, cmap: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``image`` ``(B, C, h, w)`` at a coordinate map ``(B, H, W, 2)`` -> ``(B, C, H, W)``
    (bilinear; outside the image: ``padding_mode``)."""
    return F.grid_sample(image, cmap.to(image.dtype), mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


def sample_points(field: torch.Tensor, pts: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """A dense field ``(B, C, H, W)`` read at points ``(B, M, 2)`` (normalised) -> ``(B, M, C)``."""
    out = F.grid_sample(field, pts.unsqueeze(1).to(field.dtype), mode="bilinear", padding_mode=padding_mode,
                        align_corners=True)  # (B, C, 1, M)
    return out[:, :, 0].transpose(1, 2)


def invert_points(fn, targets: torch.Tensor, init: torch.Tensor, iters: int = 30, eps: float = 1e-4) -> torch.Tensor:
    """Solve ``fn(p) = targets`` for ``p`` by Newton's method (central-difference Jacobian).

    ``fn`` maps ``(B, M, 2) -> (B, M, 2)`` and must be smooth and locally invertible near the
    answer (the synthetic warps are); ``init`` ``(B, M, 2)`` is the starting point (e.g. the
    inverse of the warp's affine part). Returns ``(B, M, 2)``.
    """
    p = init.clone()
    ex = p.new_tensor([eps, 0.0])
    ey = p.new_tensor([0.0, eps])
    for _ in range(iters):
        r = fn(p) - targets
        jx = (fn(p + ex) - fn(p - ex)) / (2 * eps)  # (B, M, 2): d f / d x
        jy = (fn(p + ey) - fn(p - ey)) / (2 * eps)
        J = torch.stack([jx, jy], dim=-1)  # (B, M, 2, 2): column k is d f / d p_k
        step = torch.linalg.solve(J, r.unsqueeze(-1)).squeeze(-1)
        p = p - step
        if step.abs().max() < 1e-12:
            break
    return p
