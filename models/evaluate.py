"""Ground-truth evaluation of an aligner on a :class:`models.perturb.PairedSet`.

Used by the tests and the benchmarks, for every method alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import geometry as G
from . import metrics as M
from .catalog import create_method
from .methods import FitContext
from .perturb import PairedSet

__all__ = ["PairEval", "evaluate_warps", "evaluate_collection", "run_on_pairs"]


@dataclass
class PairEval:
    n_images: int
    residual_before: float  # mean pair residual, source pixels, identity warps
    residual_after: float
    residual_after_median: float
    residual_ratio: float  # after / before (target <= 0.2)
    apsnr_before: float
    apsnr_after: float
    apsnr_undone: float  # the perturbation exactly undone
    content_kept: float  # mean fraction of foreground mass kept (target >= 0.85)
    content_kept_p10: float
    frame_size_median: float  # the aligned frame's linear size in the source (1: the source's own)
    # The pair residual at the source object's own pixels (metrics.object_residual: independent of
    # the aligned frame, so a zoom cannot lower it); None when the pairs do not carry their sources.
    object_residual_before: float | None = None
    object_residual_after: float | None = None
    object_residual_after_median: float | None = None
    object_residual_ratio: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def evaluate_warps(pairs: PairedSet, in_from_out_norm: torch.Tensor) -> PairEval:
    """Score backward warps ``(2N, 3, 3)`` (normalised, working frame = image frame)."""
    x = pairs.images.double()
    size = tuple(x.shape[-2:])
    Mn = in_from_out_norm.double().cpu()
    pix = G.pixel_from_normalised(Mn, size, size)
    eye = torch.eye(3, dtype=torch.float64).expand_as(pix)
    sa, sb, _, _ = pairs.split(pix)
    N = pairs.n_sources
    before = M.pair_residual(sa, sb, eye[:N], eye[N:], size)
    after = M.pair_residual(sa, sb, pix[:N], pix[N:], size)
    aligned = G.warp(x, Mn, size)
    undone = G.warp_pixel(x, torch.linalg.inv(pairs.src_from_input), size)
    kept = M.content_kept(x, pix, size)
    src_from_out = pairs.src_from_input.double() @ pix
    sizes = M.frame_size(src_from_out, size)
    obj = {}
    if pairs.sources is not None:
        mass = M.foreground_mass(pairs.sources.double())[:, 0]
        ob = M.object_residual(pairs.src_from_input[:N].double(), pairs.src_from_input[N:].double(), mass)
        oa = M.object_residual(src_from_out[:N], src_from_out[N:], mass)
        obj = dict(object_residual_before=float(ob.mean()), object_residual_after=float(oa.mean()),
                   object_residual_after_median=float(oa.median()),
                   object_residual_ratio=float(oa.mean() / ob.mean().clamp_min(1e-9)))
    return PairEval(
        n_images=x.shape[0],
        residual_before=float(before.mean()),
        residual_after=float(after.mean()),
        residual_after_median=float(after.median()),
        residual_ratio=float(after.mean() / before.mean().clamp_min(1e-9)),
        apsnr_before=M.apsnr(x),
        apsnr_after=M.apsnr(aligned),
        apsnr_undone=M.apsnr(undone),
        content_kept=float(kept.mean()),
        content_kept_p10=float(torch.quantile(kept, 0.1)),
        frame_size_median=float(sizes.median()),
        **obj,
    )


class _Moments:
    """Per-pixel mean and sum of squared deviations over a stream of batches (Chan et al.'s merge)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:  # x: (B, C, H, W) float64
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = (x - mb).pow(2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        d = mb - self.mean
        self.mean = self.mean + d * (nb / n)
        self.m2 = self.m2 + m2b + d.pow(2) * (self.n * nb / n)
        self.n = n

    def apsnr(self) -> float:
        """:func:`models.metrics.apsnr` of everything added (the batches in [0, 255])."""
        mse = float(self.m2.sum()) / (self.n * self.m2.numel())
        return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _rows(a, lo: int, hi: int, device) -> torch.Tensor:
    """Rows ``lo .. hi`` of an array-like (NumPy, memory-mapped, sharded or torch) as a float64 tensor;
    images ``(n, H, W)`` get a channel axis, uint8 is scaled to [0, 1]."""
    x = a[lo:hi]
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))  # a copy: memmaps are read-only
    scale = t.dtype == torch.uint8
    t = t.to(device=device, dtype=torch.float64)
    return t / 255.0 if scale else t


def _lower_median(v: np.ndarray) -> float:
    # torch.median's definition (the lower of the two middle values), which evaluate_warps uses.
    k = (len(v) - 1) // 2
    return float(np.partition(v, k)[k])


def evaluate_collection(images, src_from_input, orig_from_out, *, sources=None, copies: int = 2,
                        chunk: int | None = None, device: str | torch.device = "cpu") -> PairEval:
    """:func:`evaluate_warps`'s measures for a collection of any size, streamed in chunks.

    The layout is :class:`models.perturb.PairedSet`'s generalised to ``copies``: image ``k`` shows
    source ``k % S`` with ``S = N / copies``. Pairs are consecutive copies of a source (copy
    ``c`` and ``c + 1``; for 2 copies, exactly :func:`evaluate_warps`'s pairs).

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)`` array-like sliceable by rows (a NumPy memmap, a
            :class:`models.synth.ShardedArray`, a tensor), uint8 (0-255) or float in [0, 1].
        src_from_input: ``(N, 3, 3)`` ground truth, pixel, perturbed image -> source.
        orig_from_out: ``(N, 3, 3)`` the job's pixel transforms, aligned-output pixel -> input pixel
            (the product's public convention; output frame = input frame).
        sources: ``(S, H, W)`` or ``(S, C, H, W)``, the unperturbed sources, for the object
            residual (None: left out, as in :func:`evaluate_warps`).
        chunk: sources per step (default 1024 on a CPU, where small steps stay in cache and
            measured fastest, 65536 on a GPU); memory is one step's images on ``device`` plus
            float32 copies of the per-image and per-pair values that the medians and the 10th
            percentile need (12 bytes per image for 2 copies).
    Returns:
        :class:`PairEval` (``seconds`` = 0: no fit was timed).
    """
    N = len(images)
    if len(src_from_input) != N or len(orig_from_out) != N:
        raise ValueError(f"{N} images but {len(src_from_input)} ground-truth and {len(orig_from_out)} job transforms")
    if copies < 2 or N % copies:
        raise ValueError(f"{N} images cannot hold {copies} copies of each source (need copies >= 2 dividing N)")
    S = N // copies
    if chunk is None:
        chunk = 1024 if torch.device(device).type == "cpu" else 65536
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if sources is not None and len(sources) != S:
        raise ValueError(f"{len(sources)} sources for {N} images in {copies} copies (expected {S})")
    if tuple(orig_from_out.shape[1:]) != (3, 3) or tuple(src_from_input.shape[1:]) != (3, 3):
        raise ValueError("transforms must be (N, 3, 3)")
    first = _rows(images, 0, 1, device)
    size = tuple(first.shape[-2:])
    eye = torch.eye(3, dtype=torch.float64, device=device)
    m_before, m_after, m_undone = _Moments(), _Moments(), _Moments()
    P = S * (copies - 1)  # pairs
    after_all = np.empty(P, np.float32)
    obj_all = np.empty(P, np.float32) if sources is not None else None
    kept_all = np.empty(N, np.float32)
    size_all = np.empty(N, np.float32)
    sums = dict(before=0.0, after=0.0, obj_before=0.0, obj_after=0.0, kept=0.0)
    # cuDNN's grid sampler refuses large batches (pytorch/pytorch#88380); the native kernel does not.
    with torch.backends.cudnn.flags(enabled=False):
        for a in range(0, S, chunk):
            b = min(a + chunk, S)
            n = b - a
            mass = M.foreground_mass(_rows(sources, a, b, device).view(n, -1, *size))[:, 0] if sources is not None else None
            truth, warps = [], []
            for c in range(copies):
                lo, hi = c * S + a, c * S + b
                x = _rows(images, lo, hi, device).view(n, -1, *size)  # (n, C, H, W)
                W = _rows(src_from_input, lo, hi, device)
                pix = _rows(orig_from_out, lo, hi, device)
                m_before.add(x * 255.0)
                m_after.add(G.warp_pixel(x, pix, size) * 255.0)
                m_undone.add(G.warp_pixel(x, torch.linalg.inv(W), size) * 255.0)
                kept = M.content_kept(x, pix, size)
                sums["kept"] += float(kept.sum())
                kept_all[lo:hi] = kept.cpu().numpy()
                size_all[lo:hi] = M.frame_size(W @ pix, size).cpu().numpy()
                truth.append(W)
                warps.append(pix)
            for c in range(copies - 1):
                sa, sb, wa, wb = truth[c], truth[c + 1], warps[c], warps[c + 1]
                e = eye.expand(n, 3, 3)
                sums["before"] += float(M.pair_residual(sa, sb, e, e, size).sum())
                after = M.pair_residual(sa, sb, wa, wb, size)
                sums["after"] += float(after.sum())
                after_all[c * S + a:c * S + b] = after.cpu().numpy()
                if mass is not None:
                    sums["obj_before"] += float(M.object_residual(sa, sb, mass).sum())
                    oa = M.object_residual(sa @ wa, sb @ wb, mass)
                    sums["obj_after"] += float(oa.sum())
                    obj_all[c * S + a:c * S + b] = oa.cpu().numpy()
    before, after = sums["before"] / P, sums["after"] / P
    obj = {}
    if obj_all is not None:
        ob, oa = sums["obj_before"] / P, sums["obj_after"] / P
        obj = dict(object_residual_before=ob, object_residual_after=oa,
                   object_residual_after_median=_lower_median(obj_all),
                   object_residual_ratio=oa / max(ob, 1e-9))
    return PairEval(
        n_images=N,
        residual_before=before,
        residual_after=after,
        residual_after_median=_lower_median(after_all),
        residual_ratio=after / max(before, 1e-9),
        apsnr_before=m_before.apsnr(),
        apsnr_after=m_after.apsnr(),
        apsnr_undone=m_undone.apsnr(),
        content_kept=sums["kept"] / N,
        content_kept_p10=float(np.quantile(kept_all.astype(np.float64), 0.1)),
        frame_size_median=_lower_median(size_all),
        **obj,
    )


def run_on_pairs(pairs: PairedSet, method: str = "dprc", *, warp: str = "homography",
                 device: str | torch.device = "cpu", seed: int = 0, budget: int | None = None,
                 options: dict | None = None, progress=None) -> tuple[PairEval, object]:
    """Fit ``method`` on the paired images and score it. Returns ``(PairEval, FitResult)``."""
    m = create_method(method, **(options or {}))
    t0 = time.time()
    res = m.fit(pairs.images.to(device), FitContext(warp=warp, seed=seed, budget=budget, progress=progress))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    ev = evaluate_warps(pairs, res.in_from_out_norm)
    ev.seconds = secs
    return ev, res
