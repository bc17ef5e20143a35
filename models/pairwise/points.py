"""Point transfer between the two images of an aligned pair. NumPy only (no torch): the
service's API maps points with it.

A pair's matrix ``M`` is ``source_from_target`` in pixels (the product's convention with the
target as the aligned output): a target pixel ``p`` shows the scene point that the source
shows at ``M p``. Points are ``(x, y)``, pixel centres at integer coordinates, origin at the
centre of the top-left pixel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["target_to_source", "source_to_target", "apply_homography", "DIRECTIONS", "transfer"]

DIRECTIONS = ("target_to_source", "source_to_target")


def apply_homography(M, points) -> np.ndarray:
    """``(3, 3)`` homography applied to ``(N, 2)`` points -> ``(N, 2)`` float64. A point the
    homography sends to infinity comes back as ``nan``."""
    M = np.asarray(M, np.float64)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    if M.shape != (3, 3):
        raise ValueError(f"a homography is 3x3, got {M.shape}")
    q = np.concatenate([p, np.ones((len(p), 1))], axis=1) @ M.T
    w = q[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = q[:, :2] / w
    out[~np.isfinite(out).all(axis=1) | (np.abs(w[:, 0]) < 1e-12)] = np.nan
    return out


def target_to_source(M, points) -> np.ndarray:
    """Where target points lie in the source: ``M p``."""
    return apply_homography(M, points)


def source_to_target(M, points) -> np.ndarray:
    """Where source points lie in the target: ``M^-1 p`` (``nan`` for a singular ``M``)."""
    M = np.asarray(M, np.float64)
    try:
        inv = np.linalg.inv(M)
    except np.linalg.LinAlgError:
        return np.full((len(np.asarray(points).reshape(-1, 2)), 2), np.nan)
    return apply_homography(inv, points)


def transfer(M, points, direction: str) -> np.ndarray:
    """``direction``: ``"target_to_source"`` or ``"source_to_target"``."""
    if direction == "target_to_source":
        return target_to_source(M, points)
    if direction == "source_to_target":
        return source_to_target(M, points)
    raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
