"""Keypoint transfer through a canonical grid, and the scores of it. NumPy only (no torch): the
service's API transfers points with it from a finished job's ``flows.npy``.

A job's flows are ``canon_from_image`` maps ``(N, H, W, 2)``: for each pixel of each working-size
image, its point on the canonical grid (normalised, ``align_corners=True``). A point ``p`` of
image ``a`` goes to the pixel ``q`` of image ``b`` whose canonical point is nearest to ``a``'s at
``p`` (ASIC's transfer), refined below the pixel by Newton steps on ``b``'s map. Points are
``(x, y)`` in working-size pixels: pixel centres at integers, origin at the top-left centre;
:func:`input_from_working` and :func:`working_from_input` carry them to and from an input image's
own pixels (the resize geometry of ``models.geometry.original_from_resized``).

Scores (``bench/dense.py``): PCK@alpha is the share of ground-truth-visible keypoints
transferred within ``alpha * max(H, W)`` pixels of the truth. *k-cycle PCK* (ASIC) carries each
keypoint around a cycle of ``k`` distinct images ``i1 -> i2 -> ... -> ik -> i1`` and counts those
that come back within the threshold of where they started; *k-chain PCK* (ours) carries it along
``i1 -> ... -> ik`` and compares with the truth in ``ik`` (a method that never moves anything, like
the identity, is perfectly cycle-consistent but not chain-accurate, so the two are read together).
"""
from __future__ import annotations

import numpy as np

__all__ = ["bilinear", "input_from_working", "working_from_input", "transfer_points", "pck", "pair_pck", "cycle_pck", "chain_pck", "sample_cycles"]

_CHUNK = 1 << 22  # point-candidate distances computed at once (floats)


def input_from_working(points, input_size, working_size) -> np.ndarray:
    """Pixel points ``(M, 2)`` (x, y) of a working-size image -> the same points in the input image
    it was resized from; sizes ``(H, W)``. Pixel centres of the two span the same extent."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    s = np.array([input_size[1] / working_size[1], input_size[0] / working_size[0]], np.float64)
    return p * s + 0.5 * s - 0.5


def working_from_input(points, input_size, working_size) -> np.ndarray:
    """The inverse of :func:`input_from_working`."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    s = np.array([input_size[1] / working_size[1], input_size[0] / working_size[0]], np.float64)
    return (p + 0.5) / s - 0.5


def bilinear(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``field`` ``(H, W, C)`` read at pixel points ``(M, 2)`` (clamped to the image) -> ``(M, C)``."""
    H, W = field.shape[:2]
    x = np.clip(pts[:, 0], 0, W - 1)
    y = np.clip(pts[:, 1], 0, H - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), W - 2) if W > 1 else np.zeros(len(x), np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), H - 2) if H > 1 else np.zeros(len(y), np.int64)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    x1 = np.minimum(x0 + 1, W - 1)
    y1 = np.minimum(y0 + 1, H - 1)
    return ((1 - fy) * ((1 - fx) * field[y0, x0] + fx * field[y0, x1])
            + fy * ((1 - fx) * field[y1, x0] + fx * field[y1, x1]))


def _nearest(cb: np.ndarray, cand: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Index into ``cand`` of the canonical point nearest each target, chunked."""
    out = np.empty(len(target), np.int64)
    step = max(1, _CHUNK // max(1, len(cand)))
    pts = cb[cand]  # (K, 2)
    for s in range(0, len(target), step):
        d = ((target[s:s + step, None, :] - pts[None]) ** 2).sum(-1)
        out[s:s + step] = d.argmin(1)
    return cand[out]


def transfer_points(flows: np.ndarray, a: int, b: int, points, masks: np.ndarray | None = None,
                    refine: int = 2, min_mask_pixels: int = 16) -> np.ndarray:
    """Points of image ``a`` -> the matching points of image ``b``.

    Args:
        flows: ``(N, H, W, 2)`` ``canon_from_image`` maps (normalised canonical coordinates).
        a, b: image indices.
        points: ``(M, 2)`` pixel points of image ``a``.
        masks: optional ``(N, H, W)`` foreground in [0, 1]; when given, ``b``'s candidates are its
            pixels at or above 0.5 (all of them if fewer than ``min_mask_pixels`` are).
        refine: Newton steps below the pixel (0: the nearest pixel centre).
    Returns:
        ``(M, 2)`` float64 pixel points of image ``b``.
    """
    flows = np.asarray(flows)
    N, H, W, _ = flows.shape
    if not (0 <= a < N and 0 <= b < N):
        raise IndexError(f"image index out of range: {a}, {b} (collection of {N})")
    p = np.asarray(points, np.float64).reshape(-1, 2)
    if len(p) == 0:
        return np.zeros((0, 2))
    target = bilinear(flows[a].astype(np.float64), p)  # (M, 2) canonical
    fb = flows[b].astype(np.float64)
    cb = fb.reshape(-1, 2)
    cand = np.arange(H * W)
    if masks is not None:
        fg = np.flatnonzero(np.asarray(masks[b]).reshape(-1) >= 0.5)
        if len(fg) >= min_mask_pixels:
            cand = fg
    idx = _nearest(cb, cand, target)
    q = np.stack([idx % W, idx // W], 1).astype(np.float64)
    for _ in range(refine):
        # Newton on c_b(q) = target, with the Jacobian of b's map by central differences.
        e = 0.5
        jx = (bilinear(fb, q + [e, 0]) - bilinear(fb, q - [e, 0])) / (2 * e)
        jy = (bilinear(fb, q + [0, e]) - bilinear(fb, q - [0, e])) / (2 * e)
        J = np.stack([jx, jy], -1)  # (M, 2, 2)
        r = target - bilinear(fb, q)
        det = J[:, 0, 0] * J[:, 1, 1] - J[:, 0, 1] * J[:, 1, 0]
        ok = np.abs(det) > 1e-12
        step = np.zeros_like(q)
        inv = np.stack([np.stack([J[:, 1, 1], -J[:, 0, 1]], -1), np.stack([-J[:, 1, 0], J[:, 0, 0]], -1)], -2)
        step[ok] = np.einsum("mij,mj->mi", inv[ok], r[ok]) / det[ok, None]
        q = q + np.clip(step, -1.0, 1.0)  # a folded map must not throw the point away
        q[:, 0] = np.clip(q[:, 0], 0, W - 1)
        q[:, 1] = np.clip(q[:, 1], 0, H - 1)
    return q


def pck(pred: np.ndarray, truth: np.ndarray, threshold_px: float) -> float:
    """Share of rows of ``pred`` within ``threshold_px`` of ``truth`` (both ``(M, 2)``)."""
    if len(pred) == 0:
        return float("nan")
    return float((np.linalg.norm(pred - truth, axis=1) <= threshold_px).mean())


def _kp_transfer(transfer, a: int, b: int, pts: np.ndarray) -> np.ndarray:
    return np.asarray(transfer(a, b, pts), np.float64).reshape(-1, 2)


def pair_pck(transfer, keypoints: np.ndarray, visible: np.ndarray, alpha: float, size: tuple[int, int]) -> float:
    """PCK@alpha over every ordered pair ``(a, b)``, ``a != b``: ``transfer(a, b, pts) -> pts``;
    keypoints ``(N, K, 2)`` pixels, visible ``(N, K)``."""
    thr = alpha * max(size)
    hits = total = 0
    N = len(keypoints)
    for a in range(N):
        for b in range(N):
            if a == b:
                continue
            v = visible[a] & visible[b]
            if not v.any():
                continue
            pred = _kp_transfer(transfer, a, b, keypoints[a][v])
            hits += int((np.linalg.norm(pred - keypoints[b][v], axis=1) <= thr).sum())
            total += int(v.sum())
    return hits / total if total else float("nan")


def sample_cycles(n_images: int, k: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random sequences of ``k`` distinct images, ``(count, k)``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_images, size=k, replace=False) for _ in range(count)])


def _carry(transfer, seq, pts):
    for a, b in zip(seq[:-1], seq[1:]):
        pts = _kp_transfer(transfer, int(a), int(b), pts)
    return pts


def _pck_along(transfer, keypoints, visible, cycles: np.ndarray, alpha: float, size, back: bool) -> float:
    """Share of keypoints carried along each sequence (and back to its start if ``back``) that land
    within ``alpha * max(size)`` of their true position there; keypoints visible in every image of
    the sequence only."""
    thr = alpha * max(size)
    hits = total = 0
    for seq in cycles:
        v = visible[seq].all(0)
        if not v.any():
            continue
        path = list(seq) + [seq[0]] if back else list(seq)
        end = _carry(transfer, path, keypoints[seq[0]][v])
        hits += int((np.linalg.norm(end - keypoints[path[-1]][v], axis=1) <= thr).sum())
        total += int(v.sum())
    return hits / total if total else float("nan")


def cycle_pck(transfer, keypoints, visible, cycles: np.ndarray, alpha: float, size) -> float:
    """k-cycle PCK (ASIC): around ``i1 -> ... -> ik -> i1``, back within ``alpha * max(size)`` of the
    start; keypoints visible in every image of the cycle only."""
    return _pck_along(transfer, keypoints, visible, cycles, alpha, size, back=True)


def chain_pck(transfer, keypoints, visible, cycles: np.ndarray, alpha: float, size) -> float:
    """Along ``i1 -> ... -> ik``, within ``alpha * max(size)`` of the truth in ``ik``."""
    return _pck_along(transfer, keypoints, visible, cycles, alpha, size, back=False)
