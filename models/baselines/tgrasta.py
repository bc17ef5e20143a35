"""t-GRASTA (He, Zhang, Balzano, Lui; IMAVIS 2014): transformed Grassmannian
robust adaptive subspace tracking. Method name ``tgrasta``.

Model: each aligned, unit-norm image lies near a ``d``-dimensional subspace
``span(U)`` (``U`` ``(m, d)`` orthonormal, a point on the Grassmannian) plus a
sparse error. The collection is streamed in mini-batches; for every image of a
batch, with ``U`` fixed, the linearised robust fit

    min_{w, e, dp} |e|_1   s.t.   y(M_i) + J_i dp = U w + e

is solved by ADMM (:func:`models.baselines._common.robust_subspace_step`),
its warp updated ``M_i <- M_i P(dp)``, and then ``U`` takes one step along a
Grassmannian geodesic in the descent direction of the augmented Lagrangian,
``Gamma w^T`` with ``Gamma = (I - U U^T) y_dual`` (the final multipliers):
for the batch direction ``D = P S Q^T`` (thin SVD, ``P`` orthogonal to ``U``)

    U(t) = U Q cos(S t) Q^T + P sin(S t) Q^T

(Edelman, Arias, Smith 1998). We average the batch's gradients and scale
``t`` so the largest rotation angle of a step is ``step_size / sqrt(1 + pass)``
radians: GRASTA's raw gradient scale depends on ``m`` and the multipliers,
a fixed angle budget does not.

Memory is bounded: beyond the input and the ``N`` warps, a step holds one
mini-batch's Jacobians (``batch_size x m x dof``) and ``U``; the cost of a
pass is linear in ``N``. The budget is the number of passes over the
collection, split over the coarse-to-fine blur levels; the subspace is
initialised from the leading singular vectors of the first batch.

The same stabilisers as RASL apply (see :mod:`models.baselines.rasl`):
coarse-to-fine blur, a per-update trust region, frame anchoring.

``apply``: the tracked subspace is saved; new images are aligned to it by the
same robust step (:class:`models.baselines.aligners.SubspaceAligner`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.methods import FitContext, FitResult, register_method

from . import _common as C
from . import linearise as L
from .aligners import ApplyConfig, SubspaceAligner

__all__ = ["TGrastaConfig", "TGrasta", "geodesic_step"]


@dataclass(frozen=True)
class TGrastaConfig:
    """t-GRASTA settings (overridable through ``FitContext.options`` or the factory)."""

    subspace_dim: int = 1
    batch_size: int = 100
    max_iters: int = 16  # passes over the collection, all levels (FitContext.budget overrides)
    admm_iters: int = 25
    step_size: float = 0.3  # largest geodesic rotation per subspace step, radians (decays with passes)
    levels: tuple[float, ...] = (2.0, 1.0)
    level_caps: tuple = ()
    max_step: float | None = 0.2
    damping: float = 1e-3  # Levenberg-Marquardt ridge on dp, relative to tr(J^T J)/dof
    max_side: int = 64
    center: bool = True
    apply_iters: int = 10


def geodesic_step(U: torch.Tensor, direction: torch.Tensor, max_angle: float) -> torch.Tensor:
    """Move ``U`` ``(m, d)`` along the Grassmann geodesic with tangent ``direction`` ``(m, d)``.

    ``direction`` must satisfy ``U^T direction = 0``. The step length is chosen so
    that the largest principal angle turned is ``max_angle``. Returns ``(m, d)``
    with orthonormal columns.
    """
    P, S, Qh = torch.linalg.svd(direction.double(), full_matrices=False)  # (m, d), (d,), (d, d)
    if float(S.max()) <= 0:
        return U
    theta = S / S.max() * max_angle  # (d,)
    Q = Qh.T
    Ud = U.double()
    Un = (Ud @ Q) * torch.cos(theta) @ Qh + P * torch.sin(theta) @ Qh
    Un, _ = torch.linalg.qr(Un)  # re-orthonormalise against round-off
    return Un.to(U.dtype)


class TGrasta:
    name = "tgrasta"

    def __init__(self, config: TGrastaConfig | None = None, **overrides):
        self.config = C.merge_config(config or TGrastaConfig(), overrides, self.name)

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        """``images``: ``(N, C, H, W)`` in [0, 1] on the target device."""
        start = C.start_fit(self, images, ctx)
        cfg, family, rep, ckpt, M, step = start.cfg, start.family, start.rep, start.ckpt, start.M, start.step
        X, fill = start.prep.images, start.prep.fill
        N = X.shape[0]
        d = max(1, min(cfg.subspace_dim, start.prep.m))
        B = max(1, min(cfg.batch_size, N))
        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        U = start.saved.get("U")
        notes = [f"subspace dim {d}, batch {B}", f"fit size {start.prep.size[0]}x{start.prep.size[1]}"]
        if start.resumed:
            notes.append(f"resumed from checkpoint at pass {step}")
        for li, sigma in enumerate(cfg.levels):
            if li < start.start_level:
                continue
            fam = C.level_family(family, start.caps[li])
            Xl = L.gaussian_blur(X, sigma)
            for k in range(start.first_iter(li), start.budgets[li]):
                ctx.check_stop()
                perm = torch.randperm(N, generator=gen).to(X.device)
                angle = cfg.step_size / math.sqrt(1.0 + step)
                loss, raw = 0.0, torch.empty(N, start.prep.m, dtype=X.dtype, device=X.device)
                for s in range(0, N, B):
                    idx = perm[s:s + B]
                    xb = Xl[idx]
                    lin = L.linearise(xb, M[idx], fam, normalise=True, fill=fill[idx])
                    raw[idx] = lin.raw
                    if U is None:
                        U = C.orthonormal_basis(lin.y.T, d)
                    st = C.robust_subspace_step(lin.y, lin.jac, U, iters=cfg.admm_iters, ridge=cfg.damping)
                    dp = L.clip_step(st.dp, fam, cfg.max_step)
                    M[idx] = C.finite_or(L.compose_update(M[idx], dp, fam), M[idx])
                    gamma = st.dual - (st.dual @ U) @ U.T  # (b, m), tangent to span(U)
                    U = geodesic_step(U, gamma.T @ st.w / idx.numel(), angle)
                    loss += float(st.e.abs().sum())
                M = C.anchor(M, family, ctx.reference_index, cfg.center)
                step += 1
                rep.step(step, li, loss / N, raw.view_as(X), angle=angle)
                ckpt.save(step, li, k + 1, {"M": M, "U": U})
        aligner = SubspaceAligner(self.name, family, U, tuple(X.shape[1:]),
                                  ApplyConfig(levels=cfg.levels, iters_per_level=cfg.apply_iters,
                                              basis_blur=float(cfg.levels[-1]) if cfg.levels else 0.0))
        if ctx.reference_index is not None:
            notes.append("output frame = the reference image's frame")
        return FitResult(M.float().cpu(), ctx.reference_index, aligner, rep.history, notes)


@register_method("tgrasta")
def create_tgrasta(**overrides) -> TGrasta:
    return TGrasta(TGrastaConfig(), **overrides)
