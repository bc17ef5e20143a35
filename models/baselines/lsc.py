"""Least-squares congealing (Cox, Sridharan, Lucey, Cohn; CVPR 2008, ICCV 2009).
Method name ``lsc``.

Objective: the sum of squared differences between every aligned image and
the others, ``sum_i |y_i(M_i) - T_{-i}|^2`` with ``T_{-i}`` the mean of the
other aligned images. Each outer iteration is one inverse-compositional
Gauss-Newton step of every image towards the evolving mean:

* the template is the current mean ``T`` of the warped images; its
  steepest-descent images ``SD = grad T . dW/dp`` at the identity and the
  Hessian ``H = SD^T SD`` are shared by all images (the ICCV 2009 device that
  makes the cost per image ``O(m dof)``);
* the error of image ``i`` against the leave-one-out mean is
  ``y_i - T_{-i} = N / (N - 1) (y_i - T)``;
* ``dp_i = H^-1 SD^T (y_i - T_{-i})`` and ``M_i <- M_i P(dp_i)^-1``.

Using the full mean's gradient for ``T_{-i}`` is the usual approximation
(exact as ``N`` grows). Intensities are not normalised by default (``normalise``
switches to unit-norm images, for collections with varying exposure).

Because every image is pulled to the mean, the collection as a whole can
shrink (zoom out): a smaller object overlaps more. ``center`` (default on)
pins the mean warp at the identity after every step, which removes that
common mode (see :func:`models.baselines.linearise.center_warps`).
The other stabilisers are shared with RASL: coarse-to-fine blur and a
per-update trust region.

``apply``: the final mean is saved; new images are aligned to it by
inverse-compositional Gauss-Newton
(:class:`models.baselines.aligners.TemplateAligner`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import geometry as G
from models.methods import FitContext, FitResult, register_method

from . import _common as C
from . import linearise as L
from .aligners import ApplyConfig, TemplateAligner, steepest_descent

__all__ = ["LscConfig", "LSC"]


@dataclass(frozen=True)
class LscConfig:
    """Least-squares congealing settings (overridable through ``FitContext.options`` or the factory)."""

    max_iters: int = 60  # Gauss-Newton steps over all levels (FitContext.budget overrides)
    tol: float = 1e-4  # stop a level when the mean corner move of a step is below this (normalised)
    step: float = 1.0  # Gauss-Newton step scale
    normalise: bool = False
    levels: tuple[float, ...] = (2.0, 1.0)
    level_caps: tuple = ()
    max_step: float | None = 0.2
    max_side: int = 64
    center: bool = True
    apply_iters: int = 10


def _corner_move(dp: torch.Tensor, family: str) -> torch.Tensor:
    c = G.unit_corners(like=dp)
    return (G.transform_points(G.params_to_matrix(dp, family), c) - c).norm(dim=-1).mean(dim=1)


class LSC:
    name = "lsc"

    def __init__(self, config: LscConfig | None = None, **overrides):
        self.config = C.merge_config(config or LscConfig(), overrides, self.name)

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        """``images``: ``(N, C, H, W)`` in [0, 1] on the target device."""
        start = C.start_fit(self, images, ctx)
        cfg, family, rep, ckpt, M, step = start.cfg, start.family, start.rep, start.ckpt, start.M, start.step
        X, fill = start.prep.images, start.prep.fill
        N = X.shape[0]
        notes = [f"fit size {start.prep.size[0]}x{start.prep.size[1]}", "updates: inverse compositional to the mean"]
        if start.resumed:
            notes.append(f"resumed from checkpoint at step {step}")
        scale = N / max(N - 1, 1)
        for li, sigma in enumerate(cfg.levels):
            if li < start.start_level:
                continue
            fam = C.level_family(family, start.caps[li])
            Xl = L.gaussian_blur(X, sigma)
            for k in range(start.first_iter(li), start.budgets[li]):
                ctx.check_stop()
                raw = L.warp_flat(Xl, M, fill)  # (N, m)
                y = raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12) if cfg.normalise else raw
                T = y.mean(0)  # (m,)
                sd, Hinv = steepest_descent(T.view(1, *X.shape[1:]), fam)  # (m, dof), (dof, dof)
                err = (y - T) * scale  # (N, m)
                dp = cfg.step * (err @ sd) @ Hinv.T  # (N, dof)
                dp = L.clip_step(dp, fam, cfg.max_step)
                M = C.finite_or(L.compose_update(M, dp, fam, inverse=True), M)
                M = C.anchor(M, family, ctx.reference_index, cfg.center)
                step += 1
                move = float(_corner_move(dp, fam).mean())
                rep.step(step, li, float(err.pow(2).sum(1).mean()), raw.view_as(X), corner_move=move)
                ckpt.save(step, li, k + 1, {"M": M})
                if move < cfg.tol:
                    break
        template = L.warp_flat(X, M, fill).mean(0).view(*X.shape[1:])
        aligner = TemplateAligner(self.name, family, template,
                                  ApplyConfig(levels=cfg.levels, iters_per_level=cfg.apply_iters))
        if ctx.reference_index is not None:
            notes.append("output frame = the reference image's frame")
        return FitResult(M.float().cpu(), ctx.reference_index, aligner, rep.history, notes)


@register_method("lsc")
def create_lsc(**overrides) -> LSC:
    return LSC(LscConfig(), **overrides)
