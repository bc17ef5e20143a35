"""Ground-truth evaluation of an aligner on a :class:`models.perturb.PairedSet`.

Used by the tests and the benchmarks, for every method alike.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from . import geometry as G
from . import metrics as M
from .methods import FitContext, create_method
from .perturb import PairedSet

__all__ = ["PairEval", "evaluate_warps", "run_on_pairs"]


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
