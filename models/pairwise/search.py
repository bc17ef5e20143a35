"""A global search for a pair's homography: where the learned method starts.

The learned method (:mod:`models.pairwise.learned`) refines a homography by gradient descent and,
like the paper's, needs a rough initial alignment: DeTone-style pairs (each corner moved by up to a
quarter of the image) mostly start outside its basin. This module finds a start with classic,
closed-form computations, nothing pretrained:

1. **Features that survive a change of modality**: a soft histogram of *unsigned* gradient
   orientation (angle modulo pi) per pixel, weighted by a saturating function of the gradient
   magnitude, smoothed over a cell, the image's mean histogram subtracted
   (:func:`orientation_features`). Inverting intensities, remapping them non-monotonically,
   taking one colour channel or the gradient magnitude changes the sign and the size of the
   gradients but mostly not their orientation modulo pi.
2. **An exhaustive search over similarities** at a coarse level (:func:`similarity_search`): the
   source is warped by every rotation x scale of a grid (about the images' centres), its features
   computed, and the normalised cross-correlation with the target's features over their overlap is
   evaluated at every translation at once by FFT. The best candidates, kept apart by non-maximum
   suppression on their corner positions, are returned.
3. **Block matching and a robust fit** (:func:`match_refine`, a few rounds, coarse to fine): the
   source is warped by a candidate, the target cut into blocks, each block's best shift found by the
   same FFT correlation (sub-pixel), and a homography fitted to the block matches by RANSAC and
   weighted least squares (:func:`ransac_homography`), all candidates of all pairs as one batch. After
   the first rounds only the best candidates go on; they are ranked by the correlation at the end
   (:func:`global_search`).
4. **A dense sub-pixel refinement** (:func:`refine_homography`): the block matches' sub-pixel peaks
   leave the homography about a pixel off where the photometric change is strong; the enhanced
   correlation coefficient (Evangelidis & Psarakis's ECC, Gauss-Newton on the normalised
   correlation) of a dense, modality-robust field (:func:`orientation_field`: the doubled-angle
   gradient direction, weighted by a saturating magnitude) moves all eight parameters at once,
   coarse to fine; a pair keeps its start where the correlation does not improve.

Conventions (those of :mod:`models.geometry`): a homography ``M`` is ``source_from_target`` in
*normalised* coordinates of each image (``[-1, 1]`` from the centre of the first pixel to the centre
of the last, x right, y down), so ``target(p) ~ source(M p)`` at any resolution. Images are
``(B, C, H, W)`` floats; device and dtype follow the input.

Speed (one CPU thread, 128 px pairs: about 0.25 s a pair, docs/research/pairwise-search-speed.md): the
blurs are products with banded matrices, each correlation transforms its target once for all the
canvases it is compared with, and on a CPU the similarity search runs a few canvases at a time and
the block matching, the candidate scores and the refinement a few pairs at a time (:func:`_chunks`:
large batches otherwise leave the caches). None of it changes a pair's answer beyond float rounding
and the refinement's stopping tolerance (``refine_tol``: a chunk's iterations stop together).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import geometry as G
from ..imageops import gauss_kernel

__all__ = ["SearchConfig", "orientation_features", "similarity_homographies", "translation_ncc",
           "similarity_search", "global_search", "corner_distance", "fit_homography",
           "ransac_homography", "match_refine", "orientation_field", "refine_homography", "block_agreement"]


@dataclass(frozen=True)
class SearchConfig:
    """Options of the global search (the learned method's ``search_*`` options map onto these)."""

    size: int = 64  # longer side of the search level, px
    angles: float = 30.0  # rotations searched: -angles..+angles degrees
    angle_step: float = 7.5
    scales: tuple[float, float] = (0.7, 1.43)  # scale range searched (source px per target px)
    scale_steps: int = 7  # log-spaced
    shift: float = 0.375  # largest translation searched, fraction of the image side
    bins: int = 8  # orientation bins over [0, pi)
    kappa: float = 2.0  # concentration of the soft orientation binning
    smooth: float = 0.0  # Gaussian smoothing of the images before their gradients, px of the level
    cell: float = 1.5  # Gaussian smoothing of the histograms, px of the search level
    min_overlap: float = 0.35  # smallest overlap (fraction of the target) a candidate may have
    overlap_power: float = 1.0  # the similarity search's score times (overlap fraction) ** this
    candidates: int = 6  # candidates kept after the similarity search
    identity: bool = True  # the identity refined beside them
    separation: float = 0.15  # their smallest mean corner distance, normalised units
    # block-matching rounds of global_search: (level's longer side px, blocks a side, block px, search radius px)
    rounds: tuple[tuple[int, int, int, int], ...] = ((64, 4, 24, 12), (128, 5, 32, 8), (128, 6, 32, 4),
                                                     (128, 8, 24, 3))
    # before this round, keep only the `keep` best candidates (by correlation). 1 (was 2): the 128 px
    # round 1 then refines 2 candidates, not 7; on both benchmark seeds' 128 pairs no correct pair
    # moved and the shares under 1 / 3 px held, at ~20 % less time (docs/research/pairwise-search-speed.md)
    prune_after: int = 1
    keep: int = 2
    # dense refinement (refine_homography): (level's longer side px, Gauss-Newton iterations) per
    # level, coarse to fine; () for none
    refine: tuple[tuple[int, int], ...] = ((64, 10), (128, 15))
    refine_smooth: float = 0.5  # Gaussian smoothing of the images before their gradients, px of the level
    refine_cell: float = 0.7  # Gaussian smoothing of the orientation field, px of the level
    refine_step: float = 2.0  # largest corner move of one iteration, px of the level
    # a level's iterations stop once no pair of the chunk moves a corner by more than this (px of the
    # level): the median pair has converged after about 6 of 15; 0 runs every iteration
    refine_tol: float = 1e-3
    # block_agreement (the learned method's confidence): (level's longer side px, blocks a side,
    # block px, search radius px), the largest shift of an agreeing block (px of the level), and the
    # disagreeing blocks added to the count
    agreement: tuple[int, int, int, int] = (128, 7, 20, 8)
    agreement_tolerance: float = 1.0
    agreement_prior: float = 4.0


# How many numbers the largest working tensor of a chunk of pairs (or of canvases) may hold, by
# device type: a CPU slows down once they leave its caches (a 2 MiB L2 here: 2^20 was faster than
# 2^21-2^22, docs/research/pairwise-search-speed.md); a GPU wants them large.
_CHUNK_NUMBERS = {"cpu": 1 << 20, "other": 1 << 28}

# --------------------------------------------------------------------------- features


def _blur_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """``(n, n)``: a convolution with ``kernel`` ``(2r + 1,)`` along an axis of ``n`` px, the
    replicate padding folded in (row ``j`` holds the weights of the pixels that output ``j`` reads)."""
    r = kernel.numel() // 2
    idx = (torch.arange(n, device=kernel.device)[:, None] + torch.arange(-r, r + 1, device=kernel.device)).clamp(0, n - 1)
    K = torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device)
    return K.scatter_add_(1, idx, kernel.expand(n, -1).contiguous())


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`models.imageops.blur` (separable Gaussian, replicate padding), ``(B, C, H, W)`` -> same,
    by two matrix products with banded matrices: the same to float rounding, and on a CPU 4-15x
    faster than its grouped convolutions at these kernels (5-11 taps) and sizes (64-152 px)."""
    if sigma <= 0.05:
        return x
    k = gauss_kernel(sigma, x)
    return _blur_matrix(x.shape[-2], k) @ (x @ _blur_matrix(x.shape[-1], k).T)


def _erode(mask: torch.Tensor, r: int = 2) -> torch.Tensor:
    """A 0/1 mask ``(B, C, H, W)`` eroded by a ``(2r + 1)^2`` square (the window clipped at the image's
    edge: ``-max_pool2d(-mask, 2r + 1, 1, r)``): 1 where the window holds only ones. Its sums of
    ones are exact integers, so this is max-pooling's answer exactly, by two products with banded
    matrices (several times faster on a CPU)."""
    box = torch.ones(2 * r + 1, dtype=mask.dtype, device=mask.device)
    count = _blur_matrix(mask.shape[-2], box) @ (mask @ _blur_matrix(mask.shape[-1], box).T)
    return (count > (2 * r + 1) ** 2 - 0.5).to(mask.dtype)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(-2, -1), keepdim=True)
    return (x - m) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)


def orientation_features(x: torch.Tensor, bins: int = 8, kappa: float = 2.0, cell: float = 1.5,
                         mask: torch.Tensor | None = None, smooth: float = 0.0) -> torch.Tensor:
    """Soft histograms of unsigned gradient orientation, ``(B, C, H, W)`` -> ``(B, bins, H, W)``.

    The gradient of every channel (central differences of the image standardised per channel) is
    turned into its doubled-angle vector ``(gx^2 - gy^2, 2 gx gy)`` and these are summed over
    channels: the sum's angle is twice the dominant orientation modulo pi, its length the squared
    magnitude ``m^2``. Each pixel votes ``w = m / (m + mean m)`` (saturating, so that a modality
    that changes the gradients' strength changes the votes little) into ``bins`` orientations with
    the weight ``exp(kappa (cos 2(phi - c_k) - 1))``; the votes are smoothed by a Gaussian of
    ``cell`` px and each channel's mean over the image (over ``mask`` ``(B, 1, H, W)`` if given) is
    subtracted. Differentiable in ``x``.
    """
    x = _standardise(x) if mask is None else x
    if smooth > 0:
        x = _blur(x, smooth)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    c2 = (gx.square() - gy.square()).sum(1)  # (B, H, W): |v| cos 2 phi
    s2 = (2 * gx * gy).sum(1)
    m2 = (c2.square() + s2.square() + 1e-12).sqrt()  # squared gradient magnitude
    cos2, sin2 = c2 / m2, s2 / m2  # cos 2 phi, sin 2 phi
    m = m2.sqrt()
    if mask is not None:
        m = m * mask[:, 0]
        mean = m.sum((-2, -1), keepdim=True) / mask[:, 0].sum((-2, -1), keepdim=True).clamp_min(1.0)
    else:
        mean = m.mean((-2, -1), keepdim=True)
    w = m / (m + mean.clamp_min(1e-6))
    k = torch.arange(bins, dtype=x.dtype, device=x.device) * (math.pi / bins)
    # kappa (cos 2(phi - c) - 1) = kappa cos 2c cos 2phi + kappa sin 2c sin 2phi - kappa: every bin's
    # exponent at once, as a (bins, 3) x (3, H W) product per image (one pass over the bins, not five)
    coef = torch.stack([kappa * torch.cos(2 * k), kappa * torch.sin(2 * k), torch.full_like(k, -kappa)], 1)
    B, H, W = cos2.shape
    h = torch.matmul(coef, torch.stack([cos2, sin2, torch.ones_like(cos2)], 1).view(B, 3, H * W))
    h = h.view(B, bins, H, W).exp_() * w[:, None]  # (B, bins, H, W)
    h = _blur(h, cell)
    if mask is None:
        return h - h.mean((-2, -1), keepdim=True)
    h = h * mask
    mean = h.sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True).clamp_min(1.0)
    return h.addcmul_(mean, mask, value=-1)  # (h - mean) * mask, h already masked


# --------------------------------------------------------------------------- similarity search


def similarity_homographies(angles: torch.Tensor, scales: torch.Tensor, src_size: tuple[int, int],
                            tgt_size: tuple[int, int]) -> torch.Tensor:
    """Rotations by ``angles`` (radians, ``(K,)``) with isotropic scalings ``scales`` ``(K,)`` about
    the images' centres, as ``source_from_target`` **pixel** matrices ``(K, 3, 3)``: the target's
    centre goes to the source's centre, a target vector ``v`` to ``s R(a) v`` (x right, y down: a
    positive angle turns x towards y). Dtype and device follow ``angles``."""
    (hs, ws), (ht, wt) = src_size, tgt_size
    c, s = torch.cos(angles) * scales, torch.sin(angles) * scales
    cs = angles.new_tensor([(ws - 1) / 2, (hs - 1) / 2])
    ct = angles.new_tensor([(wt - 1) / 2, (ht - 1) / 2])
    M = torch.zeros(angles.shape[0], 3, 3, dtype=angles.dtype, device=angles.device)
    M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1] = c, -s, s, c
    M[:, 0, 2] = cs[0] - (c * ct[0] - s * ct[1])
    M[:, 1, 2] = cs[1] - (s * ct[0] + c * ct[1])
    M[:, 2, 2] = 1
    return M


def translation_ncc(ft: torch.Tensor, mt: torch.Tensor, fw: torch.Tensor, mw: torch.Tensor, pad: int,
                    min_overlap: float, overlap_power: float = 0.0) -> torch.Tensor:
    """Normalised cross-correlation of target features with warped source features at every shift.

    Args:
        ft: ``(..., C, H, W)`` target features, ``mt`` ``(..., 1, H, W)`` where they are valid.
        fw: ``(..., C, H + 2 pad, W + 2 pad)`` source features on a canvas whose pixel ``q`` is the
            target's pixel ``q - pad``; ``mw`` ``(..., 1, ...)`` where they are valid. The leading
            dimensions of the target's and the source's broadcast: one target against many warped
            sources (``(P, 1, C, H, W)`` with ``(P, K, C, ...)``) is transformed once.
        pad: the largest shift, px.
        min_overlap: shifts whose overlap is below this fraction of the target's valid pixels get -1.
        overlap_power: the score is multiplied by the overlap's fraction of the target to this power
            (0: not at all).

    Returns:
        ``(..., 2 pad + 1, 2 pad + 1)``: entry ``[pad + ty, pad + tx]`` scores the map that sends the
        target's pixel ``p`` to the canvas at ``p + (tx, ty)``,
        ``sum ft(p) fw(p + t) / sqrt(sum |ft(p)|^2 mw(p + t) * sum |fw(p + t)|^2 mt(p))``.
    """
    H, W = ft.shape[-2:]
    if tuple(fw.shape[-2:]) != (H + 2 * pad, W + 2 * pad):
        raise ValueError(f"the canvas must be {(H + 2 * pad, W + 2 * pad)}, not {tuple(fw.shape[-2:])}")
    return _ncc_stacked(_ncc_stack(ft, mt), _ncc_stack(fw, mw), pad, min_overlap, overlap_power)


def _ncc_stack(f: torch.Tensor, m: torch.Tensor, masked: bool = False) -> torch.Tensor:
    """One side of :func:`translation_ncc`: features ``(..., C, H, W)`` and their mask ``(..., 1, H, W)``
    -> ``(..., C + 2, H, W)``: the masked features, the mask, and the masked features' energy (squares
    summed over channels). Pointwise: blocks may be cut from it rather than from its inputs.
    ``masked``: ``f`` is 0 outside a 0/1 ``m`` already (masked features), so ``f * m`` is ``f``."""
    fm = f if masked else f * m
    return torch.cat([fm, m.expand_as(fm[..., :1, :, :]), fm.square().sum(-3, keepdim=True)], -3)


def _ncc_stacked(tgt: torch.Tensor, src: torch.Tensor, pad: int, min_overlap: float, overlap_power: float = 0.0
                 ) -> torch.Tensor:
    """:func:`translation_ncc` of the stacks of :func:`_ncc_stack`: the target's ``(..., C + 2, H, W)``,
    the canvas's ``(..., C + 2, H + 2 pad, W + 2 pad)`` (leading dimensions broadcast) ->
    ``(..., 2 pad + 1, 2 pad + 1)``."""
    C = tgt.shape[-3] - 2
    size = tuple(src.shape[-2:])
    # Four circular correlations (summed over channels) on the canvas, as products of spectra:
    # out[t] = sum_q a[q] b[q + t] with the target at the canvas's origin, so that entry t is the
    # shift t - pad (no shift wraps around: the canvas is the target grown by pad a side).
    Ft = torch.fft.rfft2(tgt, s=size).conj_physical()  # once: a lazy conjugate is resolved in every product
    Fw = torch.fft.rfft2(src)
    # num (features), e_s (mask x source energy), e_t (target energy x mask), ov (mask x mask)
    spec = torch.stack([(Ft[..., :C, :, :] * Fw[..., :C, :, :]).sum(-3), Ft[..., C, :, :] * Fw[..., C + 1, :, :],
                        Ft[..., C + 1, :, :] * Fw[..., C, :, :], Ft[..., C, :, :] * Fw[..., C, :, :]], -3)
    # the inverse transform of the 2 pad + 1 rows and columns wanted only: along y in full, then
    # along x for those rows (irfft2's result there, bit for bit, at half its cost)
    n = 2 * pad + 1
    out = torch.fft.irfft(torch.fft.ifft(spec, dim=-2)[..., :n, :], n=size[1], dim=-1)[..., :n]
    num, e_s, e_t, ov = out.unbind(-3)
    score = num / (e_s.clamp_min(1e-9) * e_t.clamp_min(1e-9)).sqrt()
    total = tgt[..., C, :, :].sum((-2, -1))[..., None, None]
    if overlap_power:
        # a small overlap matches well by chance more easily: its score counts for less
        score = score * (ov.clamp_min(0) / total).clamp_max(1) ** overlap_power
    need = min_overlap * total
    return torch.where(ov >= need, score, torch.full_like(score, -1.0))


def _translate(t: torch.Tensor) -> torch.Tensor:
    """``(K, 2)`` -> pixel translations ``(K, 3, 3)``."""
    M = torch.eye(3, dtype=t.dtype, device=t.device).repeat(t.shape[0], 1, 1)
    M[:, :2, 2] = t
    return M


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _level_size(size: tuple[int, int], longer: int) -> tuple[int, int]:
    h, w = size
    s = min(1.0, longer / max(h, w))
    return max(8, round(h * s)), max(8, round(w * s))


def corner_distance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Mean distance between where two ``source_from_target`` normalised homographies send the
    corners of ``[-1, 1]^2``, ``(..., 3, 3)`` x ``(..., 3, 3)`` (broadcast) -> ``(...)``, normalised units."""
    shape = torch.broadcast_shapes(A.shape, B.shape)
    A, B = A.expand(shape).reshape(-1, 3, 3), B.expand(shape).reshape(-1, 3, 3)
    c = G.unit_corners(like=A)
    d = (G.transform_points(A, c) - G.transform_points(B, c)).norm(dim=-1).mean(-1)
    return d.view(shape[:-2])


def _nms(M: torch.Tensor, score: torch.Tensor, k: int, sep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy non-maximum suppression of one pair's candidates ``M`` ``(N, 3, 3)``, ``score`` ``(N,)``:
    the ``k`` best that are at least ``sep`` apart (:func:`corner_distance`), padded with the best."""
    order = torch.argsort(score, descending=True)[: 50 * k]
    # every candidate's distance to every other at once (corner_distance's arithmetic), then greedy
    c = G.transform_points(M[order], G.unit_corners(like=M))  # (n, 4, 2)
    apart = ((c[:, None] - c[None]).norm(dim=-1).mean(-1) >= sep).tolist()  # (n, n)
    kept_at: list[int] = []  # positions in order
    for j in range(len(apart)):
        if all(apart[j][q] for q in kept_at):
            kept_at.append(j)
        if len(kept_at) == k:
            break
    kept = [int(order[j]) for j in kept_at]
    while len(kept) < k:
        kept.append(kept[0])
    idx = torch.tensor(kept, device=M.device)
    return M[idx], score[idx]


def similarity_search(source: torch.Tensor, target: torch.Tensor, cfg: SearchConfig = SearchConfig(),
                      should_stop: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best similarities (rotation, scale, translation) between each pair's images.

    Args:
        source: ``(B, Cs, Hs, Ws)``; target: ``(B, Ct, Ht, Wt)`` (any channel counts).
        should_stop: called before each pair (the search takes them one at a time); raise from it to stop.

    Returns:
        ``(B, K, 3, 3)`` ``source_from_target`` normalised homographies, best first, and their
        scores ``(B, K)`` (normalised correlation over the overlap, in [-1, 1]); ``K = cfg.candidates``.
    """
    B = source.shape[0]
    dev, dt = source.device, source.dtype
    ss = _level_size(tuple(source.shape[-2:]), cfg.size)
    st = _level_size(tuple(target.shape[-2:]), cfg.size)
    src = _standardise(_resize(source, ss))
    tgt = _standardise(_resize(target, st))
    mt = torch.ones(B, 1, *st, dtype=dt, device=dev)
    ft = orientation_features(tgt, cfg.bins, cfg.kappa, cfg.cell, smooth=cfg.smooth)
    n_a = round(2 * cfg.angles / cfg.angle_step) + 1 if cfg.angles > 0 else 1
    angles = torch.linspace(-cfg.angles, cfg.angles, n_a, dtype=dt, device=dev) * (math.pi / 180)
    lo, hi = math.log(cfg.scales[0]), math.log(cfg.scales[1])
    scales = torch.exp(torch.linspace(lo, hi, cfg.scale_steps, dtype=dt, device=dev)) if cfg.scale_steps > 1 \
        else torch.ones(1, dtype=dt, device=dev)
    aa, sc = torch.meshgrid(angles, scales, indexing="ij")
    A = similarity_homographies(aa.flatten(), sc.flatten(), ss, st)  # (R, 3, 3) pixels
    R = A.shape[0]
    pad = max(1, round(cfg.shift * max(st)))
    canvas = (st[0] + 2 * pad, st[1] + 2 * pad)
    from_canvas = A @ _translate(torch.full((1, 2), -float(pad), dtype=dt, device=dev))  # (R, 3, 3)
    # what does not depend on the pair: the canvas's valid mask, the candidates' matrices
    ones = torch.ones(1, 1, *ss, dtype=dt, device=dev)
    valid = G.warp_pixel(ones.expand(R, -1, -1, -1), from_canvas, canvas) > 0.999
    valid = _erode(valid.to(dt))  # no features of the border padding
    t = torch.arange(-pad, pad + 1, dtype=dt, device=dev)
    ty, tx = torch.meshgrid(t, t, indexing="ij")
    shift = _translate(torch.stack([tx.flatten(), ty.flatten()], -1))  # (n*n, 3, 3): p -> p + t
    # target p -> canvas p + t + pad -> source A (p + t): pixels
    M_pix = (A[:, None] @ shift[None]).reshape(-1, 3, 3)  # (R * n*n, 3, 3)
    canvas_chunks = _chunks(R, (cfg.bins + 2) * canvas[0] * canvas[1], dev)
    best_M, best_s = [], []
    for b in range(B):  # a pair at a time: R warped canvases of C features each are already large
        if should_stop is not None:
            should_stop()
        tstack = _ncc_stack(ft[b:b + 1], mt[b:b + 1])
        score = []
        for rs in canvas_chunks:  # a few canvases at a time (their features stay in a CPU's caches)
            warped = G.warp_pixel(src[b:b + 1].expand(rs.stop - rs.start, -1, -1, -1), from_canvas[rs], canvas,
                                  padding_mode="border")
            fw = orientation_features(warped, cfg.bins, cfg.kappa, cfg.cell, mask=valid[rs], smooth=cfg.smooth)
            # translation_ncc; the target's (1, C + 2, H, W) broadcasts against the canvases: transformed once
            score.append(_ncc_stacked(tstack, _ncc_stack(fw, valid[rs], masked=True), pad, cfg.min_overlap,
                                      cfg.overlap_power))  # (canvases, 2pad+1, 2pad+1)
        flat = torch.cat(score).reshape(-1)  # (R (2pad+1)^2,)
        top = torch.topk(flat, min(flat.numel(), 200 * cfg.candidates)).indices
        Mn = G.normalised_from_pixel(M_pix[top], ss, st)
        Mk, sk = _nms(Mn, flat[top], cfg.candidates, cfg.separation)
        best_M.append(Mk)
        best_s.append(sk)
    return torch.stack(best_M), torch.stack(best_s)


# --------------------------------------------------------------------------- scoring a homography


def _ncc_at(src: torch.Tensor, ft: torch.Tensor, M: torch.Tensor, cfg: SearchConfig) -> torch.Tensor:
    """Normalised correlation of target features ``ft`` ``(N, C, H, W)`` with the features of the source
    ``src`` ``(N, Cs, hs, ws)`` (standardised) warped by ``M`` ``(N, 3, 3)`` (normalised), over their overlap."""
    size = ft.shape[-2:]
    w = G.warp(src, M, tuple(size), padding_mode="border")
    ones = torch.ones(src.shape[0], 1, *src.shape[-2:], dtype=src.dtype, device=src.device)
    valid = G.warp(ones, M, tuple(size))
    valid = (valid > 0.999).to(src.dtype) * valid  # differentiable inside, 0 outside
    valid = -F.max_pool2d(-valid, 5, 1, 2)
    fw = orientation_features(w, cfg.bins, cfg.kappa, cfg.cell, mask=valid, smooth=cfg.smooth)
    ftm = ft * valid
    num = (ftm * fw).sum((1, 2, 3))
    den = (ftm.square().sum((1, 2, 3)) * fw.square().sum((1, 2, 3))).clamp_min(1e-9).sqrt()
    ov = valid.mean((1, 2, 3))
    return torch.where(ov >= cfg.min_overlap, num / den, torch.full_like(num, -1.0))


# --------------------------------------------------------------------------- block matching + RANSAC


def fit_homography(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted least-squares homography (DLT with ``H[2, 2] = 1``) mapping ``src`` onto ``dst``.

    Args:
        src, dst: ``(N, n, 2)`` corresponding points, ``n >= 4`` (use well-conditioned coordinates,
            e.g. normalised ones); weights: ``(N, n)`` non-negative (0 drops a point), default 1.

    Returns:
        ``(N, 3, 3)`` with ``dst ~ H src``; exact for four points in general position. Degenerate
        sets (fewer than four weighted points, collinear points) give non-finite or meaningless
        entries rather than an error (check with :func:`torch.isfinite`).
    """
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    z, o = torch.zeros_like(x), torch.ones_like(x)
    ru = torch.stack([x, y, o, z, z, z, -u * x, -u * y], dim=-1)  # (N, n, 8)
    rv = torch.stack([z, z, z, x, y, o, -v * x, -v * y], dim=-1)
    A = torch.cat([ru, rv], dim=1)  # (N, 2n, 8)
    b = torch.cat([u, v], dim=1)  # (N, 2n)
    w = torch.ones_like(x) if weights is None else weights
    w = torch.cat([w, w], dim=1)
    AtA = A.transpose(1, 2) @ (A * w[..., None])
    Atb = (A * w[..., None]).transpose(1, 2) @ b[..., None]
    h = torch.linalg.solve_ex(AtA, Atb)[0][..., 0]
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(-1, 3, 3)


def ransac_homography(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor, threshold: float,
                      hypotheses: int = 128, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """RANSAC over 4-point samples, then a weighted least-squares refit on the inliers, batched.

    Args:
        src, dst: ``(N, n, 2)``; weights: ``(N, n)`` (0: not a match; sampling is proportional to it).
        threshold: inlier distance, in the units of ``dst``.
        generator: the random numbers, drawn once for all ``N`` rows: each row's answer depends on
            its own points and the generator's state only.

    Returns:
        ``(N, 3, 3)`` (``dst ~ H src``; the identity where fewer than 4 points have weight) and the
        inlier masks ``(N, n)`` of the refit.
    """
    N, n, _ = src.shape
    dev, dt = src.device, src.dtype
    w = weights.clamp_min(0)
    ok = (w > 0).sum(1) >= 4
    # Samples of 4 without replacement, with probabilities proportional to the weights, by Gumbel
    # top-k. The random numbers are drawn once for all pairs ((hypotheses, n): their count does not
    # depend on the batch), so a pair's answer never depends on the other pairs of its batch.
    u = torch.rand(hypotheses, n, generator=generator, device=dev, dtype=dt).clamp(1e-12, 1 - 1e-12)
    keys = torch.log(w)[:, None, :] - torch.log(-torch.log(u))[None]  # (N, h, n); log 0 = -inf
    idx = torch.topk(keys, 4, dim=-1).indices  # (N, hypotheses, 4)
    s4 = torch.gather(src[:, None].expand(-1, hypotheses, -1, -1), 2, idx[..., None].expand(-1, -1, -1, 2))
    d4 = torch.gather(dst[:, None].expand(-1, hypotheses, -1, -1), 2, idx[..., None].expand(-1, -1, -1, 2))
    H = fit_homography(s4.reshape(-1, 4, 2), d4.reshape(-1, 4, 2)).view(N, hypotheses, 3, 3)

    def inliers(H):  # H (N, h, 3, 3) -> (N, h, n)
        h = H.shape[1]
        p = G.transform_points(H.reshape(-1, 3, 3), src.repeat_interleave(h, 0)).view(N, h, n, 2)
        e = (p - dst[:, None]).norm(dim=-1)
        return torch.nan_to_num(e, nan=float("inf")) < threshold

    inl = inliers(H) & (w[:, None] > 0)
    support = (inl * w[:, None]).sum(-1)  # (N, h)
    support = torch.where(torch.isfinite(H).flatten(2).all(-1), support, torch.full_like(support, -1.0))
    best = support.argmax(1)
    Hb = H[torch.arange(N, device=dev), best]
    mask = inl[torch.arange(N, device=dev), best]
    for _ in range(2):  # refit on the inliers, then once more on the refit's inliers
        Hr = fit_homography(src, dst, w * mask)
        good = torch.isfinite(Hr).flatten(1).all(1) & (mask.sum(1) >= 4)
        Hb = torch.where(good[:, None, None], Hr, Hb)
        mask = inliers(Hb[:, None])[:, 0] & (w > 0)
    eye = torch.eye(3, dtype=dt, device=dev).expand(N, 3, 3)
    return torch.where(ok[:, None, None], Hb, eye), mask & ok[:, None]


def _peak(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel argmax of ``(N, h, w)`` score maps by a parabola through the peak and its neighbours
    along each axis: ``(N, 2)`` (x, y) in map pixels and the peak value ``(N,)``."""
    N, h, w = score.shape
    flat = score.reshape(N, -1)
    val, i = flat.max(1)
    y, x = i // w, i % w

    def at(yy, xx):
        return score[torch.arange(N, device=score.device), yy.clamp(0, h - 1), xx.clamp(0, w - 1)]

    def vertex(m, c, p, inside):
        den = m - 2 * c + p
        off = torch.where(inside & (den < 0), 0.5 * (m - p) / den.where(den < 0, -torch.ones_like(den)),
                          torch.zeros_like(den))
        return off.clamp(-0.5, 0.5)

    dx = vertex(at(y, x - 1), val, at(y, x + 1), (x > 0) & (x < w - 1))
    dy = vertex(at(y - 1, x), val, at(y + 1, x), (y > 0) & (y < h - 1))
    return torch.stack([x.to(score.dtype) + dx, y.to(score.dtype) + dy], -1), val


@torch.no_grad()
def _warp_to_canvas(src: torch.Tensor, M: torch.Tensor, ss: tuple[int, int], st: tuple[int, int], pad: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The source ``(N, C, *ss)`` warped by ``M`` (normalised ``source_from_target``) onto the
    target's frame ``st`` grown by ``pad`` px a side, so that a block can be shifted by up to
    ``pad`` px; and where the source covered the canvas ``(N, 1, ...)``, eroded by 2 px so that
    no feature reads the border's replicated pixels."""
    N, dt, dev = src.shape[0], src.dtype, src.device
    canvas = (st[0] + 2 * pad, st[1] + 2 * pad)
    from_canvas = G.pixel_from_normalised(M, ss, st) @ _translate(torch.full((1, 2), -float(pad), dtype=dt, device=dev))
    warped = G.warp_pixel(src, from_canvas, canvas, padding_mode="border")
    ones = torch.ones(N, 1, *ss, dtype=dt, device=dev)
    valid = (G.warp_pixel(ones, from_canvas, canvas) > 0.999).to(dt)
    return warped, _erode(valid)


def _block_origins(size: tuple[int, int], block: int, grid: int) -> tuple[int, list[tuple[int, int]]]:
    """The block side ``b`` (``block``, at most the image) and the top-left corners ``[(y0, x0), ...]``
    of a ``grid x grid`` tiling of an image of ``size`` ``(H, W)`` px."""
    H, W = size
    b = min(block, H, W)
    ys = torch.linspace(0, H - b, grid).round().long().tolist()
    xs = torch.linspace(0, W - b, grid).round().long().tolist()
    return b, [(y0, x0) for y0 in ys for x0 in xs]


def _windows(x: torch.Tensor, origins: list[tuple[int, int]], side: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, nb, C, side, side)``: the windows at ``origins`` (top-left corners)."""
    return torch.stack([x[..., y0:y0 + side, x0:x0 + side] for y0, x0 in origins], 1)


def _chunks(B: int, per_item: int, device: torch.device) -> list[slice]:
    """Slices of ``B`` items (pairs, or a pair's canvases), each holding at most
    ``_CHUNK_NUMBERS[device type]`` numbers in its largest tensor (``per_item`` an item; at least one
    item a slice)."""
    n = max(1, _CHUNK_NUMBERS.get(torch.device(device).type, _CHUNK_NUMBERS["other"]) // max(1, per_item))
    return [slice(i, min(i + n, B)) for i in range(0, B, n)]


def _block_shifts(source: torch.Tensor, target: torch.Tensor, M: torch.Tensor, ss: tuple[int, int], st: tuple[int, int],
                  origins: list[tuple[int, int]], b: int, pad: int, cfg: SearchConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`match_refine`'s block matching: each target block's best shift (sub-pixel, map px: ``pad``
    is no shift) in the canvas of each of its pair's ``K`` candidates, ``(B K nb, 2)``, the peak's
    correlation ``(B K nb,)`` and the block's energy ``(B K, nb)``; ``M`` ``(B K, 3, 3)`` pair-major."""
    B = source.shape[0]
    K = M.shape[0] // B
    src = _standardise(_resize(source, ss)).repeat_interleave(K, 0)  # (B K, Cs, *ss)
    ft = orientation_features(_standardise(_resize(target, st)), cfg.bins, cfg.kappa, cfg.cell, smooth=cfg.smooth)
    warped, valid = _warp_to_canvas(src, M, ss, st, pad)
    fw = orientation_features(warped, cfg.bins, cfg.kappa, cfg.cell, mask=valid, smooth=cfg.smooth)
    C = ft.shape[1]
    # the correlation's inputs on the whole images, then cut: the windows overlap
    tb = _windows(_ncc_stack(ft, torch.ones_like(ft[:, :1])), origins, b)  # (B, nb, C + 2, b, b)
    cb = _windows(_ncc_stack(fw, valid, masked=True), origins, b + 2 * pad).unflatten(0, (B, K))  # (B, K, nb, C + 2, b+2pad, b+2pad)
    # a block without texture matches anything: its own energy decides whether it counts
    energy = tb[:, :, C + 1].sum((-2, -1)).repeat_interleave(K, 0)  # (B K, nb)
    # each pair's target blocks against its K candidates' windows: the blocks transformed once
    score = _ncc_stacked(tb[:, None], cb, pad, 0.5)  # (B, K, nb, 2pad+1, 2pad+1)
    t, val = _peak(score.flatten(0, 2))
    return t, val, energy


def match_refine(source: torch.Tensor, target: torch.Tensor, M: torch.Tensor, longer: int, grid: int,
                 block: int, radius: int, cfg: SearchConfig = SearchConfig(), threshold: float = 2.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of block matching and a robust homography fit.

    The source is warped into the target's frame by the current ``M`` (normalised
    ``source_from_target``) at a level whose longer side is ``longer`` px; the target is cut into
    ``grid x grid`` blocks of ``block`` px, and each block's best shift (within ``radius`` px, by
    the normalised feature correlation of :func:`translation_ncc`, sub-pixel) gives one match: the
    block's centre and where it lies in the source. RANSAC (``threshold`` px of the level) and a
    weighted least-squares fit over the matches give the new homography.

    Args:
        source ``(B, Cs, Hs, Ws)``, target ``(B, Ct, Ht, Wt)``; ``M`` ``(B * K, 3, 3)``: ``K``
        candidates per pair, pair-major (the target's features and blocks are computed once a pair).

    Returns:
        The new ``(B * K, 3, 3)`` and the share of blocks that are inliers ``(B * K,)`` (where fewer
        than 4 blocks match, ``M`` unchanged).
    """
    B = source.shape[0]
    N = M.shape[0]
    K = N // B
    if N != B * K or target.shape[0] != B:
        raise ValueError(f"M must hold K candidates for each of the {B} pairs, got {tuple(M.shape)}")
    dev, dt = source.device, source.dtype
    ss = _level_size(tuple(source.shape[-2:]), longer)
    st = _level_size(tuple(target.shape[-2:]), longer)
    pad = radius
    b, origins = _block_origins(st, block, grid)
    nb = len(origins)
    centres = [(x0 + (b - 1) / 2, y0 + (b - 1) / 2) for y0, x0 in origins]
    # The block matching a few pairs at a time (each row's matches do not depend on the others): its
    # windows hold K nb (C + 2) (b + 2 pad)^2 numbers a pair, and a CPU slows down once they leave its caches.
    per_pair = K * nb * (cfg.bins + 2) * (b + 2 * pad) ** 2
    t, val, energy = [], [], []
    for sl in _chunks(B, per_pair, dev):
        tc, vc, ec = _block_shifts(source[sl], target[sl], M[sl.start * K:sl.stop * K], ss, st, origins, b, pad, cfg)
        t.append(tc)
        val.append(vc)
        energy.append(ec)
    t, val, energy = torch.cat(t), torch.cat(val), torch.cat(energy)  # (N * nb, 2), (N * nb,), (N, nb)
    t = t - pad  # shift, px
    c = torch.tensor(centres, dtype=dt, device=dev)  # (nb, 2)
    tp = c[None].expand(N, -1, -1)
    moved = tp + t.view(N, nb, 2)  # where the block's centre lies in the warped source (target frame)
    sp = G.transform_points(G.pixel_from_normalised(M, ss, st), moved)  # source pixels
    nt, ns = G.normaliser(*st, like=M), G.normaliser(*ss, like=M)
    tn = G.transform_points(nt[None].expand(N, 3, 3), tp)
    sn = G.transform_points(ns[None].expand(N, 3, 3), sp)
    w = val.view(N, nb).clamp_min(0) * (energy > 0.1 * energy.median(1, keepdim=True).values)
    thr = threshold * 2.0 / max(max(ss) - 1, 1)
    Hn, inl = ransac_homography(tn, sn, w, thr, generator=generator)
    good = (inl.sum(1) >= 4)[:, None, None]
    return torch.where(good, Hn, M), inl.to(dt).mean(1)


def _score(source: torch.Tensor, target: torch.Tensor, M: torch.Tensor, longer: int, cfg: SearchConfig) -> torch.Tensor:
    """:func:`_ncc_at` of ``M`` ``(B * K, 3, 3)`` (``K`` candidates per pair, pair-major) at a level whose
    longer side is ``longer``, ``(B * K,)``; -1 for a non-finite candidate."""
    B = source.shape[0]
    K = M.shape[0] // B
    ss = _level_size(tuple(source.shape[-2:]), longer)
    st = _level_size(tuple(target.shape[-2:]), longer)
    finite = torch.isfinite(M).flatten(1).all(1)
    M = torch.where(finite[:, None, None], M, torch.eye(3, dtype=M.dtype, device=M.device))
    # a few pairs at a time: each candidate's features are bins x the level's pixels
    out = []
    for sl in _chunks(B, K * (cfg.bins + 2) * st[0] * st[1], source.device):
        ft = orientation_features(_standardise(_resize(target[sl], st)), cfg.bins, cfg.kappa, cfg.cell,
                                  smooth=cfg.smooth).repeat_interleave(K, 0)
        src = _standardise(_resize(source[sl], ss)).repeat_interleave(K, 0)
        out.append(_ncc_at(src, ft, M[sl.start * K:sl.stop * K], cfg))
    s = torch.cat(out)
    return torch.where(finite, s, torch.full_like(s, -1.0))


@torch.no_grad()
def global_search(source: torch.Tensor, target: torch.Tensor, cfg: SearchConfig = SearchConfig(),
                  generator: torch.Generator | None = None, should_stop: Callable[[], None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate starts for each pair: :func:`similarity_search` (and the identity, ``cfg.identity``),
    then the candidates through the rounds of :func:`match_refine` (``cfg.rounds``; from round
    ``cfg.prune_after`` on, only the ``cfg.keep`` best by the normalised feature correlation), ranked
    by that correlation at the last round's level.

    Args:
        source ``(B, Cs, Hs, Ws)``, target ``(B, Ct, Ht, Wt)``.
        should_stop: called before each pair of the similarity search and before each round; raise
            from it to stop (a large batch can then be cancelled within a pair's time).

    Returns:
        ``(B, K, 3, 3)`` normalised ``source_from_target`` homographies, best first, and their scores
        ``(B, K)`` in [-1, 1] (-1: overlap below ``cfg.min_overlap``); ``K`` is ``cfg.keep`` if the
        rounds prune, else ``cfg.candidates``.
    """
    M, score = similarity_search(source, target, cfg, should_stop)
    if cfg.identity:
        # the identity too: a pair that is nearly aligned already must not depend on the grid's luck
        eye = torch.eye(3, dtype=M.dtype, device=M.device).expand(M.shape[0], 1, 3, 3)
        M = torch.cat([M, eye], dim=1)
    B, K = M.shape[:2]
    Mf = M.reshape(B * K, 3, 3)
    for r, (longer, grid, block, radius) in enumerate(cfg.rounds):
        if should_stop is not None:
            should_stop()
        if r == cfg.prune_after and cfg.keep < K:
            # only the best few candidates go on to the finer (dearer) rounds
            score = _score(source, target, Mf, longer, cfg).view(B, K)
            top = torch.topk(score, cfg.keep, dim=1).indices  # (B, keep)
            Mf = torch.gather(Mf.view(B, K, 3, 3), 1, top[..., None, None].expand(-1, -1, 3, 3)).reshape(-1, 3, 3)
            K = cfg.keep
        Mf, _ = match_refine(source, target, Mf, longer, grid, block, radius, cfg, generator=generator)
    if cfg.rounds:
        score = _score(source, target, Mf, cfg.rounds[-1][0], cfg).view(B, K)
    order = torch.argsort(score, dim=1, descending=True)
    M = torch.gather(Mf.view(B, K, 3, 3), 1, order[..., None, None].expand(-1, -1, 3, 3))
    return M, torch.gather(score, 1, order)


# --------------------------------------------------------------------------- dense refinement


def orientation_field(x: torch.Tensor, mask: torch.Tensor | None = None, cell: float = 0.7,
                      smooth: float = 0.5) -> torch.Tensor:
    """The doubled-angle gradient direction, weighted, ``(B, C, H, W)`` -> ``(B, 2, H, W)``.

    As in :func:`orientation_features` (whose histograms it summarises in two channels, a cheaper
    and sharper field for the refinement): the channels' doubled-angle gradient vectors are summed,
    the sum's unit vector ``(cos 2 phi, sin 2 phi)`` is weighted by ``m / (m + mean m)`` and
    smoothed by a Gaussian of ``cell`` px. The images are smoothed by ``smooth`` px first (noise).
    Sign and strength of the gradients do not matter, their orientation modulo pi does. With
    ``mask`` ``(B, 1, H, W)``, the mean is taken over the mask and the field is 0 outside it.
    """
    if smooth > 0:
        x = _blur(x, smooth)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    c2 = (gx.square() - gy.square()).sum(1, keepdim=True)  # (B, 1, H, W): m^2 cos 2 phi
    s2 = (2 * gx * gy).sum(1, keepdim=True)
    m2 = (c2.square() + s2.square() + 1e-12).sqrt()
    m = m2.sqrt()
    if mask is None:
        mean = m.mean((-2, -1), keepdim=True)
    else:
        mean = (m * mask).sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True).clamp_min(1.0)
    w = m / (m + mean.clamp_min(1e-6))
    h = _blur(torch.cat([c2, s2], 1) * (w / m2), cell)  # (B, 2, H, W)
    return h if mask is None else h * mask


def _field_gradients(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of ``(B, C, H, W)`` along x and y, per pixel."""
    p = F.pad(f, (1, 1, 1, 1), mode="replicate")
    return 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]), 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])


def _warped_field(src: torch.Tensor, M: torch.Tensor, size: tuple[int, int], cfg: SearchConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The source ``(N, C, h, w)`` (standardised) warped into the target's frame by ``M``
    (normalised), its :func:`orientation_field` and where it is valid ``(N, 1, H, W)`` (eroded, so
    that the border's padding does not count)."""
    w = G.warp(src, M, size, padding_mode="border")
    ones = torch.ones(src.shape[0], 1, *src.shape[-2:], dtype=src.dtype, device=src.device)
    valid = _erode((G.warp(ones, M, size) > 0.999).to(src.dtype))
    return orientation_field(w, valid, cfg.refine_cell, cfg.refine_smooth), valid


def _masked_centre(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``v`` ``(N, C, HW, ...)`` minus its mean over the mask ``m`` ``(N, 1, HW)`` per channel, 0 outside."""
    while m.ndim < v.ndim:
        m = m[..., None]
    mean = (v * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp_min(1.0)
    return (v - mean) * m


def _field_ncc(ft: torch.Tensor, fw: torch.Tensor, valid: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """Normalised correlation of two fields ``(N, C, H, W)`` over ``valid`` ``(N, 1, H, W)``, ``(N,)``;
    -1 where the overlap is below ``min_overlap`` of the target."""
    m = valid.flatten(2)
    a, b = _masked_centre(ft.flatten(2), m), _masked_centre(fw.flatten(2), m)
    ncc = (a * b).sum((1, 2)) / (a.square().sum((1, 2)) * b.square().sum((1, 2))).clamp_min(1e-12).sqrt()
    ok = (valid.mean((1, 2, 3)) >= min_overlap) & torch.isfinite(ncc)
    return torch.where(ok, ncc, torch.full_like(ncc, -1.0))


def _ecc_step(ft: torch.Tensor, fw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One Gauss-Newton step of the enhanced correlation coefficient (Evangelidis & Psarakis 2008)
    for a homography composed on the target's side: ``(N, 8)`` parameters ``(a, b, c, d, e, f, g, h)``
    of ``[[1 + a, b, c], [d, 1 + e, f], [g, h, 1]]`` (normalised target coordinates) that raise the
    correlation of ``fw(W(p))`` with ``ft(p)``; 0 where the correlation has no ascent."""
    N, _, H, W = fw.shape
    dt = torch.float64  # the 8 x 8 normal equations sum ~10^5 terms
    gx, gy = _field_gradients(fw)
    gx, gy = gx * ((W - 1) / 2), gy * ((H - 1) / 2)  # per normalised unit
    y, x = torch.meshgrid(torch.linspace(-1, 1, H, dtype=fw.dtype, device=fw.device),
                          torch.linspace(-1, 1, W, dtype=fw.dtype, device=fw.device), indexing="ij")
    x, y = x.flatten(), y.flatten()
    m = valid.flatten(2)  # (N, 1, HW)
    gx, gy = gx.flatten(2), gy.flatten(2)  # (N, C, HW)
    # J = gx d W_x / d params + gy d W_y / d params at the identity, d W_x = (x, y, 1, 0, 0, 0, -x x, -x y),
    # d W_y = (0, 0, 0, x, y, 1, -x y, -y y): a parameter at a time (no products with zeros), each
    # parameter's row contiguous
    xy = -x * y
    J = torch.stack([gx * x, gx * y, gx, gy * x, gy * y, gy, gx * (-x * x) + gy * xy, gx * xy + gy * (-y * y)], 1)
    mj = m[:, None]  # (N, 1, 1, HW)
    J = J * mj  # (N, 8, C, HW)
    J = J.sub_(J.sum(-1, keepdim=True) / mj.sum(-1, keepdim=True).clamp_min(1.0)).mul_(mj)  # centred over the mask
    J = J.reshape(N, 8, -1).to(dt)  # (N, 8, C HW)
    iw = _masked_centre(fw.flatten(2), m).reshape(N, -1).to(dt)
    tv = _masked_centre(ft.flatten(2), m).reshape(N, -1).to(dt)
    Hinv = torch.linalg.pinv(J @ J.transpose(1, 2))  # (N, 8, 8)
    ip, tp = (J @ torch.stack([iw, tv], -1)).unbind(-1)  # (N, 8) each
    ipH = (Hinv @ ip[..., None])[..., 0]
    # lambda: the scale of the target that the warped field should match (ECC's closed form)
    lam_n = iw.square().sum(1) - (ip * ipH).sum(1)
    lam_d = (iw * tv).sum(1) - (tp * ipH).sum(1)
    ascent = (lam_d > 0) & torch.isfinite(lam_d)
    lam = torch.where(ascent, lam_n / lam_d.clamp_min(1e-12), torch.zeros_like(lam_n))
    # J^T (lam tv - iw), from the products above
    dp = (Hinv @ (lam[:, None] * tp - ip)[..., None])[..., 0]
    dp = torch.where(ascent[:, None] & torch.isfinite(dp).all(1, keepdim=True), dp, torch.zeros_like(dp))
    return dp.to(fw.dtype)


@torch.no_grad()
def refine_homography(source: torch.Tensor, target: torch.Tensor, M: torch.Tensor,
                      cfg: SearchConfig = SearchConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel refinement of each pair's homography by dense correlation of orientation fields.

    At each level of ``cfg.refine`` (longer side px, iterations; coarse to fine) the source is warped
    into the target's frame by the current homography, its :func:`orientation_field` computed, and
    an ECC Gauss-Newton step (:func:`_ecc_step`) composed onto the homography on the target's side
    (forward compositional: the field is recomputed after every warp, so rotations do not disturb
    it), each step's corner moves capped at ``cfg.refine_step`` px. A pair keeps its start where the
    final correlation (at the finest level) is not above the start's, or is not finite. A level's
    iterations stop once no row moves a corner by more than ``cfg.refine_tol`` px; otherwise each row
    is independent of the others (no random numbers).

    Args:
        source ``(N, Cs, Hs, Ws)``, target ``(N, Ct, Ht, Wt)``; ``M`` ``(N, 3, 3)`` normalised
        ``source_from_target`` starts.

    Returns:
        The refined ``(N, 3, 3)`` and its correlation at the finest level ``(N,)`` (the start's where
        it was kept; -1: overlap below ``cfg.min_overlap``).
    """
    if not cfg.refine:
        return M, torch.full(M.shape[:1], float("nan"), dtype=M.dtype, device=M.device)
    N = source.shape[0]
    st = _level_size(tuple(target.shape[-2:]), max(longer for longer, _ in cfg.refine))
    chunks = _chunks(N, 8 * 2 * 2 * st[0] * st[1], source.device)  # the ECC step's float64 Jacobian
    if len(chunks) > 1:  # rows are independent
        parts = [refine_homography(source[sl], target[sl], M[sl], cfg) for sl in chunks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    eye = torch.eye(3, dtype=M.dtype, device=M.device)
    finite = torch.isfinite(M).flatten(1).all(1)
    start = torch.where(finite[:, None, None], M, eye)
    cur = start
    for longer, iters in cfg.refine:
        ss = _level_size(tuple(source.shape[-2:]), longer)
        st = _level_size(tuple(target.shape[-2:]), longer)
        src = _standardise(_resize(source, ss))
        ft = orientation_field(_standardise(_resize(target, st)), None, cfg.refine_cell, cfg.refine_smooth)
        for _ in range(iters):
            fw, valid = _warped_field(src, cur, st, cfg)
            dp = _ecc_step(ft, fw, valid)  # (N, 8)
            D = torch.cat([dp, torch.zeros_like(dp[:, :1])], 1).view(N, 3, 3) + eye
            # cap the step: no corner of the level moves by more than refine_step px
            moved = corner_distance(D, eye) * ((max(st) - 1) / 2)
            s = (cfg.refine_step / moved.clamp_min(1e-12)).clamp_max(1.0)
            cur = cur @ (eye + s[:, None, None] * (D - eye))
            cur = cur / cur[:, 2:3, 2:3]  # the scale that the parameters' convention fixes
            if cfg.refine_tol > 0 and bool((moved <= cfg.refine_tol).all()):
                break  # every pair has converged (a non-finite move has not)
    fw0, v0 = _warped_field(src, start, st, cfg)
    fw1, v1 = _warped_field(src, cur, st, cfg)
    s0 = _field_ncc(ft, fw0, v0, cfg.min_overlap)
    s1 = _field_ncc(ft, fw1, v1, cfg.min_overlap)
    better = (s1 > s0) & torch.isfinite(cur).flatten(1).all(1) & finite
    return torch.where(better[:, None, None], cur, M), torch.where(better, s1, s0)


# --------------------------------------------------------------------------- how well a homography is supported


@torch.no_grad()
def block_agreement(source: torch.Tensor, target: torch.Tensor, M: torch.Tensor, cfg: SearchConfig = SearchConfig()
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """How well the images support a homography: the share of the target's textured blocks that,
    matched on their own, agree with ``M`` (the learned method's confidence).

    The source is warped into the target's frame by ``M`` ``(N, 3, 3)`` (normalised
    ``source_from_target``) at a level whose longer side is ``longer`` px (``cfg.agreement``:
    ``(longer, grid, block, radius)``), and both are turned into :func:`orientation_field` s (the
    refinement's field: modality-robust, sharp). The target is cut into ``grid x grid`` blocks of
    ``block`` px; a block *counts* if its field has energy (at least a tenth of the pair's median
    block) and the warped source covers it entirely. Each counted block is matched on its own: the
    shift within ``radius`` px that maximises its normalised correlation with the warped field
    (:func:`translation_ncc`, sub-pixel). It *agrees* if that shift is within
    ``cfg.agreement_tolerance`` px of 0 with a positive correlation. Where ``M`` is right, most
    textured blocks find their correspondent where ``M`` puts it; where ``M`` is wrong or the images
    are unrelated, a block's best shift falls anywhere in the window (about 1 % of it is within 1 px).

    The score is ``agreeing / (counted + cfg.agreement_prior)``: the prior (blocks that count as
    disagreeing) keeps a pair with few textured blocks from a high share by chance. In [0, 1); 0
    where fewer than 4 blocks count or ``M`` is not finite. Each row is independent of the others
    (no random numbers).

    Returns:
        The score ``(N,)`` and the counted blocks ``(N,)``.
    """
    longer, grid, block, radius = cfg.agreement
    tolerance = cfg.agreement_tolerance
    N = source.shape[0]
    dt = source.dtype
    ss = _level_size(tuple(source.shape[-2:]), longer)
    st = _level_size(tuple(target.shape[-2:]), longer)
    finite = torch.isfinite(M).flatten(1).all(1)
    M = torch.where(finite[:, None, None], M, torch.eye(3, dtype=M.dtype, device=M.device))
    src = _standardise(_resize(source, ss))
    ft = orientation_field(_standardise(_resize(target, st)), None, cfg.refine_cell, cfg.refine_smooth)
    pad = radius
    warped, valid = _warp_to_canvas(src, M, ss, st, pad)
    fw = orientation_field(warped, valid, cfg.refine_cell, cfg.refine_smooth)
    b, origins = _block_origins(st, block, grid)
    nb = len(origins)
    C = ft.shape[1]
    tb = _windows(_ncc_stack(ft, torch.ones_like(ft[:, :1])), origins, b).flatten(0, 1)  # (N*nb, C + 2, b, b)
    cb = _windows(_ncc_stack(fw, valid, masked=True), origins, b + 2 * pad).flatten(0, 1)  # (N*nb, C + 2, b+2pad, b+2pad)
    inside = [valid[:, 0, y0 + pad:y0 + pad + b, x0 + pad:x0 + pad + b].mean((-2, -1)) for y0, x0 in origins]
    energy = tb[:, C + 1].sum((-2, -1)).view(N, nb)
    score = _ncc_stacked(tb, cb, pad, 0.5)  # (N*nb, 2pad+1, 2pad+1)
    t, val = _peak(score)
    off = (t - pad).norm(dim=-1).view(N, nb)  # the block's own shift from where M puts it, px
    inside = torch.stack(inside, 1)  # (N, nb): the share of the block the warped source covers
    counted = (energy > 0.1 * energy.median(1, keepdim=True).values) & (inside > 0.999)
    agree = counted & (off <= tolerance) & (val.view(N, nb) > 0)
    n = counted.sum(1)
    share = agree.sum(1).to(dt) / (n.to(dt) + cfg.agreement_prior).clamp_min(1.0)
    return torch.where((n >= 4) & finite, share, torch.zeros_like(share)), n
