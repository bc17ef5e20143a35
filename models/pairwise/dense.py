"""Dense pair maps as data, and point transfer with them. NumPy only (no torch): the service's API
maps points with it, as it does homographies with :mod:`models.pairwise.points`. The dense pair
methods (``semantic``, :mod:`models.semantic`) produce them.

A dense pair's ``warp`` (in ``pairs.json``) is the backward map target pixel -> source pixel

    p  ->  post @ [tps(pre @ [p, 1]), 1]

in the original pixels of both images: ``pre`` ``(3, 3)`` takes a target pixel to the normalised
coordinates of the target's working size; ``tps`` is the thin-plate spline of
:mod:`models.semantic.geometry`, the same convention (``tps_grid`` x ``tps_grid`` control points on ``[-1, 1]^2``, x
fastest, landing at ``tps_dst``); ``post`` ``(3, 3)``, an affine map, takes its output to source
pixels (the affine stage and the source's de-normalisation). Points: ``(x, y)``, pixel centres at
integer coordinates, origin at the centre of the top-left pixel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DENSE_TYPE", "check_warp", "dense_target_to_source", "dense_source_to_target", "dense_flow",
           "dense_transfer"]

DENSE_TYPE = "affine+tps"


def check_warp(warp: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(pre, ctrl, dst, post)`` of a warp dict; ``ValueError`` names what is malformed."""
    if not isinstance(warp, dict) or warp.get("type") != DENSE_TYPE:
        raise ValueError(f"a dense warp is a dict of type {DENSE_TYPE!r}")
    pre, post = np.asarray(warp["pre"], np.float64), np.asarray(warp["post"], np.float64)
    g = int(warp["tps_grid"])
    dst = np.asarray(warp["tps_dst"], np.float64)
    if pre.shape != (3, 3) or post.shape != (3, 3) or g < 2 or dst.shape != (g * g, 2):
        raise ValueError("a dense warp needs 3x3 'pre' and 'post' and tps_grid**2 'tps_dst' points")
    t = np.linspace(-1, 1, g)
    gy, gx = np.meshgrid(t, t, indexing="ij")
    return pre, np.stack([gx.ravel(), gy.ravel()], 1), dst, post


def _kernel(r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, r2 * np.log(np.where(r2 > 0, r2, 1.0)), 0.0)


def _coefficients(ctrl: np.ndarray, dst: np.ndarray) -> np.ndarray:
    K = len(ctrl)
    L = np.zeros((K + 3, K + 3))
    L[:K, :K] = _kernel(((ctrl[:, None] - ctrl[None]) ** 2).sum(-1))
    P1 = np.concatenate([np.ones((K, 1)), ctrl], 1)
    L[:K, K:], L[K:, :K] = P1, P1.T
    return np.linalg.solve(L, np.concatenate([dst, np.zeros((3, 2))]))  # (K + 3, 2)


def _tps(coef: np.ndarray, ctrl: np.ndarray, n: np.ndarray) -> np.ndarray:
    U = _kernel(((n[:, None] - ctrl[None]) ** 2).sum(-1))
    return np.concatenate([U, np.ones((len(n), 1)), n], 1) @ coef


def _tps_jacobian(coef: np.ndarray, ctrl: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``(N, 2, 2)``: d tps / d n. ``dU/dn = 2 (n - c) (log r^2 + 1)``."""
    d = n[:, None] - ctrl[None]  # (N, K, 2)
    r2 = (d ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(r2 > 0, 2 * (np.log(np.where(r2 > 0, r2, 1.0)) + 1), 0.0)  # (N, K)
    K = len(ctrl)
    w, A = coef[:K], coef[K + 1:]  # (K, 2) weights; rows of A for x and y: A[j, i] = d out_i / d n_j
    J = np.einsum("nk,nkj,ki->nij", f, d, w)
    return J + A.T[None]


def _h(M: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.concatenate([p, np.ones((len(p), 1))], 1) @ M.T
    return q[:, :2] / q[:, 2:3]


def dense_target_to_source(warp: dict, points) -> np.ndarray:
    """``(N, 2)`` target pixels -> source pixels."""
    pre, ctrl, dst, post = check_warp(warp)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return _h(post, _tps(_coefficients(ctrl, dst), ctrl, _h(pre, p)))


def dense_source_to_target(warp: dict, points, iterations: int = 30, tol_px: float = 1e-3) -> np.ndarray:
    """``(N, 2)`` source pixels -> the target pixels the map sends there (Newton's method from the
    best of a coarse search); ``nan`` where it does not converge (the map does not reach the point,
    or folds there)."""
    pre, ctrl, dst, post = check_warp(warp)
    q = np.asarray(points, np.float64).reshape(-1, 2)
    if not len(q):
        return np.zeros((0, 2))
    coef = _coefficients(ctrl, dst)
    t = np.linspace(-1.5, 1.5, 31)
    gy, gx = np.meshgrid(t, t, indexing="ij")
    seeds = np.stack([gx.ravel(), gy.ravel()], 1)
    seed_out = _h(post, _tps(coef, ctrl, seeds))
    n = seeds[np.argmin(((q[:, None] - seed_out[None]) ** 2).sum(-1), axis=1)]  # (N, 2) normalised target
    A = post[:2, :2]
    for _ in range(iterations):
        r = _h(post, _tps(coef, ctrl, n)) - q
        J = A[None] @ _tps_jacobian(coef, ctrl, n)
        try:
            step = np.linalg.solve(J, r[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        n = n - np.clip(step, -0.5, 0.5)  # damped: a far guess must not jump across a fold
    ok = np.linalg.norm(_h(post, _tps(coef, ctrl, n)) - q, axis=1) <= tol_px
    out = _h(np.linalg.inv(pre), n)
    out[~ok] = np.nan
    return out


def dense_flow(warp: dict, target_size: tuple[int, int], chunk: int = 65536) -> np.ndarray:
    """``(H, W, 2)`` float32: the source pixel of every target pixel (the dense correspondence field)."""
    H, W = target_size
    pre, ctrl, dst, post = check_warp(warp)
    coef = _coefficients(ctrl, dst)
    ys, xs = np.mgrid[0:H, 0:W]
    p = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    out = np.empty((H * W, 2), np.float32)
    for k in range(0, len(p), chunk):
        out[k:k + chunk] = _h(post, _tps(coef, ctrl, _h(pre, p[k:k + chunk])))
    return out.reshape(H, W, 2)


def dense_transfer(warp: dict, points, direction: str) -> np.ndarray:
    """``direction``: ``"target_to_source"`` or ``"source_to_target"``."""
    if direction == "target_to_source":
        return dense_target_to_source(warp, points)
    if direction == "source_to_target":
        return dense_source_to_target(warp, points)
    raise ValueError(f"direction must be target_to_source or source_to_target, not {direction!r}")
