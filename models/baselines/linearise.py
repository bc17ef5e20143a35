"""Linearised warping shared by the classic baselines: pure, batched functions.

Every baseline (RASL, PSSV, t-GRASTA, least-squares congealing) needs the
warped image ``y_i(x) = I_i(M_i x)`` and its Jacobian with respect to a small
parameter update. Conventions are those of :mod:`models.geometry`:

* ``M`` is ``in_from_out_norm``: normalised output point -> normalised input
  point (``align_corners=True``), identity-centred parameters.
* Every warp family's :func:`models.geometry.params_to_matrix` is *affine* in
  its parameters, ``P(p) = I + sum_k p_k E_k``, so the derivative of the
  matrix is the constant basis ``E_k`` (:func:`warp_basis`).
* Updates are **forward compositional** by default: ``M_new = M @ P(dp)``
  (the Jacobian is taken at ``dp = 0``); ``additive`` gives the Jacobian of
  ``P(p + dp)`` instead, for a matrix that is ``P(p)`` itself.
* Image gradients are central differences of the (optionally blurred) input
  image, sampled bilinearly at the warped points (the usual Lucas-Kanade
  approximation of the derivative of the interpolated image).
* Photometric normalisation (``normalise=True``) divides each warped image by
  its Frobenius norm, as RASL does, and applies the *exact* Jacobian of that
  normalisation: ``d(v/|v|) = (I - y y^T) dv / |v|``.

Images are flattened channel-major: ``m = C * H * W``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import geometry as G

__all__ = [
    "Linearisation",
    "warp_basis",
    "output_grid",
    "point_jacobian",
    "image_gradients",
    "linearise",
    "warp_flat",
    "gaussian_blur",
    "resize_max_side",
    "border_fill",
    "center_warps",
    "compose_update",
    "safe_solve",
    "clip_step",
]


@dataclass
class Linearisation:
    """Warped images and their Jacobians for one batch.

    ``y``: ``(B, m)`` warped images (normalised when asked);
    ``jac``: ``(B, m, dof)``; ``norm``: ``(B,)`` Frobenius norms before
    normalisation (ones when not normalised); ``raw``: ``(B, m)`` the warped
    images before normalisation, background fill added back.
    """

    y: torch.Tensor
    jac: torch.Tensor
    norm: torch.Tensor
    raw: torch.Tensor


def warp_basis(family: str, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``E_k = dP/dp_k``, ``(dof, 3, 3)``; constant because ``P`` is affine in ``p``."""
    dof = G.get_family(family).dof
    eye = torch.eye(dof, dtype=dtype, device=device)
    return G.params_to_matrix(eye, family) - torch.eye(3, dtype=dtype, device=device)


def output_grid(size: tuple[int, int], *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised ``(x, y)`` of every output pixel centre, row-major, ``(H*W, 2)``."""
    H, W = size
    ys = torch.linspace(-1, 1, H, dtype=dtype, device=device) if H > 1 else torch.zeros(1, dtype=dtype, device=device)
    xs = torch.linspace(-1, 1, W, dtype=dtype, device=device) if W > 1 else torch.zeros(1, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).view(H * W, 2)


def point_jacobian(M: torch.Tensor, pts: torch.Tensor, family: str, *,
                   compositional: bool = True) -> torch.Tensor:
    """Derivative of the warped points with respect to a parameter update.

    Compositional: ``d/d(dp) dehom(M P(dp) x)`` at ``dp = 0``; additive (``M``
    must be ``P(p)``): ``d/d(dp) dehom(P(p + dp) x)`` at ``dp = 0``. Both are
    ``(v_k[:2] - q v_k[2]) / w`` with ``w`` the homogeneous coordinate of
    ``M x``, ``q`` the warped point and ``v_k = M E_k x`` or ``E_k x``.

    Args:
        M: ``(B, 3, 3)``.
        pts: ``(P, 2)`` normalised output points.
    Returns:
        ``(B, P, 2, dof)``.
    """
    E = warp_basis(family, dtype=M.dtype, device=M.device)  # (dof, 3, 3)
    xh = torch.cat([pts, torch.ones_like(pts[:, :1])], dim=1).to(M.dtype)  # (P, 3)
    qh = xh @ M.transpose(1, 2)  # (B, P, 3)
    w = qh[..., 2:3]
    q = qh[..., :2] / w  # (B, P, 2)
    Ex = torch.einsum("kij,pj->pik", E, xh)  # (P, 3, dof)
    if compositional:
        v = torch.einsum("bij,pjk->bpik", M, Ex)  # (B, P, 3, dof)
    else:
        v = Ex.unsqueeze(0).expand(M.shape[0], -1, -1, -1)
    return (v[:, :, :2, :] - q.unsqueeze(-1) * v[:, :, 2:3, :]) / w.unsqueeze(-1)


def image_gradients(images: torch.Tensor) -> torch.Tensor:
    """Central-difference gradients in *normalised* units, ``(B, C, H, W) -> (B, 2C, H, W)``.

    Channels are ``[d/dx of every channel, d/dy of every channel]``. One-sided
    differences at the border (replicate padding halves the step there, so the
    border value is a half-size central difference; it is only used where a
    sample lands within a pixel of the edge).
    """
    B, C, H, W = images.shape
    p = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) * 0.5 * ((W - 1) / 2.0 if W > 1 else 0.0)
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) * 0.5 * ((H - 1) / 2.0 if H > 1 else 0.0)
    return torch.cat([gx, gy], dim=1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur in pixels (``sigma <= 0``: unchanged), replicate borders."""
    if sigma <= 0:
        return images
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    B, C, H, W = images.shape
    x = images.reshape(B * C, 1, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.view(B, C, H, W)


def resize_max_side(images: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Antialiased downscale so the longer side is at most ``max_side``.

    Normalised warps do not depend on resolution (align_corners=True maps the
    corner pixel centres to +-1 at every size), so a fit at reduced size gives
    warps valid at full size.
    """
    H, W = images.shape[-2:]
    if not max_side or max(H, W) <= max_side:
        return images
    s = max_side / max(H, W)
    size = (max(2, round(H * s)), max(2, round(W * s)))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def border_fill(images: torch.Tensor) -> torch.Tensor:
    """Background estimate per image and channel: median of the border pixels, ``(B, C)``.

    The pipeline fills samples outside an input with this value, so the fit
    does the same (it warps ``I - fill`` with zero padding and adds it back).
    """
    x = images
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    return border.median(dim=-1).values


def warp_flat(images: torch.Tensor, M: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Warp ``(B, C, H, W)`` through ``M`` ``(B, 3, 3)`` onto the same size; ``(B, C*H*W)``."""
    f = fill[..., None, None] if fill is not None else 0.0
    out = G.warp(images - f, M, tuple(images.shape[-2:]), padding_mode="zeros") + f
    return out.flatten(1)


def linearise(images: torch.Tensor, M: torch.Tensor, family: str, *, normalise: bool,
              compositional: bool = True, fill: torch.Tensor | None = None,
              grads: torch.Tensor | None = None) -> Linearisation:
    """Warp a batch and differentiate the warped pixels with respect to the warp update.

    Args:
        images: ``(B, C, H, W)`` input images (already blurred if wanted).
        M: ``(B, 3, 3)`` current ``in_from_out_norm``; output size = input size.
        family: warp family of the update.
        normalise: divide each warped image by its Frobenius norm (exact Jacobian).
        fill: ``(B, C)`` background outside the input; 0 when ``None``.
        grads: precomputed :func:`image_gradients` of ``images`` (saves work
            across outer iterations).
    Returns:
        :class:`Linearisation`.
    """
    B, C, H, W = images.shape
    M = M.to(images.dtype)
    f = fill[..., None, None] if fill is not None else images.new_zeros(B, C, 1, 1)
    if grads is None:
        grads = image_gradients(images)
    stack = torch.cat([images - f, grads], dim=1)  # (B, 3C, H, W)
    sampled = G.warp(stack, M, (H, W), padding_mode="zeros")  # (B, 3C, H, W)
    raw = (sampled[:, :C] + f).reshape(B, C * H * W)
    gx = sampled[:, C:2 * C].reshape(B, C, H * W, 1)
    gy = sampled[:, 2 * C:].reshape(B, C, H * W, 1)
    dq = point_jacobian(M, output_grid((H, W), dtype=M.dtype, device=M.device), family,
                        compositional=compositional)  # (B, HW, 2, dof)
    jac = gx * dq[:, None, :, 0, :] + gy * dq[:, None, :, 1, :]  # (B, C, HW, dof)
    jac = jac.reshape(B, C * H * W, -1)  # (B, m, dof)
    if not normalise:
        return Linearisation(raw, jac, raw.new_ones(B), raw)
    norm = raw.norm(dim=1).clamp_min(1e-12)  # (B,)
    y = raw / norm[:, None]
    yJ = torch.einsum("bm,bmk->bk", y, jac)  # (B, dof)
    jac = (jac - y[:, :, None] * yJ[:, None, :]) / norm[:, None, None]
    return Linearisation(y, jac, norm, raw)


def safe_solve(H: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Batched ``(H + ridge tr(H)/n I)^-1 b`` in float64; ``H (B, n, n)``, ``b (B, n, k)``.

    The ridge keeps blank images (zero Jacobian) at a zero update instead of NaN.
    """
    Hd = H.double()
    n = Hd.shape[-1]
    tr = Hd.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,)
    Hd = Hd + (ridge * tr / n + 1e-12)[:, None, None] * torch.eye(n, dtype=Hd.dtype, device=Hd.device)
    return torch.linalg.solve(Hd, b.double()).to(b.dtype)


def compose_update(M: torch.Tensor, dp: torch.Tensor, family: str, *, inverse: bool = False) -> torch.Tensor:
    """``M @ P(dp)`` (forward compositional) or ``M @ P(dp)^-1`` (inverse compositional)."""
    D = G.params_to_matrix(dp.to(M.dtype), family)
    if inverse:
        D = torch.linalg.inv(D)
    M = M @ D
    return M / M[:, 2:3, 2:3]


def center_warps(M: torch.Tensor, family: str) -> torch.Tensor:
    """Remove the collection's common transform: ``M_i @ P(mean_j p_j)^-1``.

    Joint alignment is defined up to one transform applied to every output
    frame. Anchoring the mean parameters at zero (Learned-Miller's congealing
    does the same) keeps the output frame where the average input frame is
    and stops the whole collection drifting or zooming out together.
    """
    p = G.matrix_to_params(M.double(), family).mean(0, keepdim=True)  # (1, dof)
    Ginv = torch.linalg.inv(G.params_to_matrix(p, family)).to(M.dtype)
    out = M @ Ginv
    return out / out[:, 2:3, 2:3]


def clip_step(dp: torch.Tensor, family: str, max_disp: float | None) -> torch.Tensor:
    """Scale each update so no frame corner moves more than ``max_disp`` (normalised units).

    A trust region for the linearised steps: where the linearisation is poor
    (thin strokes, large residuals) a full Gauss-Newton step can throw an image
    far out of the frame in one iteration. ``dp``: ``(B, dof)``.
    """
    if max_disp is None or max_disp <= 0:
        return dp
    c = G.unit_corners(like=dp)
    # A homography's corner motion is not linear in dp: rescale a few times.
    for _ in range(4):
        moved = G.transform_points(G.params_to_matrix(dp, family), c)  # (B, 4, 2)
        disp = torch.nan_to_num((moved - c).norm(dim=-1).amax(dim=1), nan=float("inf"))  # (B,)
        if bool((disp <= max_disp).all()):
            break
        dp = dp * (0.999 * max_disp / disp.clamp_min(1e-12)).clamp(max=1.0)[:, None]
    return dp
