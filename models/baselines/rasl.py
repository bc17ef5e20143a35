"""RASL (Peng et al., PAMI 2012) and PSSV (Oh et al., PAMI 2015).

Method names ``rasl`` and ``pssv``. Both solve, by repeated linearisation of
the warps,

    min_{A, E, tau}  R(A) + lambda |E|_1   s.t.  D o tau = A + E

where ``D o tau`` stacks the warped, unit-Frobenius-norm images (one row per
image here, ``(N, m)``), ``R`` is the nuclear norm for RASL and the partial
sum of singular values ``sum_{i > r} sigma_i`` (target rank ``r``) for PSSV.

Outer loop (one per iteration of the budget): warp every image at its current
``M_i``, compute the normalised image and its exact Jacobian ``J_i`` with
respect to a forward-compositional update ``M_i P(dp_i)``
(:func:`models.baselines.linearise.linearise`), solve the convex problem

    min R(A) + lambda |E|_1   s.t.  D + [J_i dp_i]_i = A + E

by the inexact augmented Lagrangian method (Peng et al., Alg. 2; Lin et al.
2010): ``A`` by singular-value thresholding (PSSV: the top ``r`` singular
values are left untouched), ``E`` by soft thresholding, ``dp_i`` by each
image's least-squares step ``(J_i^T J_i)^-1 J_i^T (...)`` (batched), the
multipliers by dual ascent with ``mu <- rho mu``. Then ``M_i <- M_i P(dp_i)``.

Implementation choices (all in :class:`RaslConfig`):

* **Singular value thresholding through the small Gram matrix.** With
  ``n = min(N, m)``, we eigendecompose the ``n x n`` Gram matrix of the
  ``(N, m)`` stack in float64 and apply the shrinkage as ``U f(S) U^T X``
  (or ``X V f(S) V^T``); the same result as a thin SVD, at ``O(n^2 max(N, m))``
  matmul cost plus one small ``eigh`` per inner iteration.
* **Coarse to fine:** the budget is split over Gaussian blur levels
  ``levels`` (pixels at the fit size); blur widens the capture range.
  ``level_caps`` can restrict the update family per level (a warp
  curriculum); off by default (it did not help on MNIST, see docs/baselines.md).
* **Trust region** (``max_step``): an update that would move a frame corner
  more than ``max_step`` (normalised units; 0.2 = 2.7 px at 28 px) is scaled
  down. RASL as published takes the full linearised step; on thin strokes
  that step occasionally throws an image out of the frame in one iteration.
* **Fit size:** images are first downscaled to ``max_side`` (normalised
  warps do not depend on resolution).
* **Frame anchoring** (``center``): after each update the mean warp
  parameters are reset to zero (the problem is invariant to a common
  transform, and RASL's normalisation does not stop the collection from
  zooming out together). With a user reference image its frame is kept.
* Photometric normalisation uses the exact Jacobian of ``v / |v|``.

``apply`` (see :mod:`models.baselines.aligners`): a basis of the final
low-rank component is saved; new images are aligned to it by the robust
subspace step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.methods import FitContext, FitResult, register_method

from . import _common as C
from . import linearise as L
from .aligners import ApplyConfig, SubspaceAligner

__all__ = ["RaslConfig", "InnerResult", "shrink_singular_values", "rasl_inner", "RASL", "create_pssv"]


@dataclass(frozen=True)
class RaslConfig:
    """RASL / PSSV settings (overridable through ``FitContext.options`` or the factory)."""

    lam: float | None = None  # weight of |E|_1; None: 1/sqrt(m) (Peng et al.)
    target_rank: int = 0  # 0: nuclear norm (RASL); r > 0: PSSV's partial sum
    max_iters: int = 40  # outer iterations over all levels (FitContext.budget overrides)
    outer_tol: float = 1e-3  # stop a level when the objective's relative change is below this
    inner_max_iters: int = 50
    # |D + J dp - A - E|_F / |D|_F; float32 images and Jacobians floor it near 1e-6
    inner_tol: float = 1e-5
    rho: float = 1.5  # growth of the ALM penalty mu (Lin et al.'s inexact ALM default)
    levels: tuple[float, ...] = (2.0, 1.0)  # Gaussian blur sigmas, fit-size pixels
    level_caps: tuple = ()  # most general update family per level (None/absent: the requested one)
    max_step: float | None = 0.2  # trust region: max corner move per update, normalised units
    max_side: int = 64
    center: bool = True
    basis_rank: int = 16  # saved basis size for apply (at most the rank of A)
    apply_iters: int = 10  # per level, when aligning new images


@dataclass
class InnerResult:
    A: torch.Tensor  # (N, m) low-rank part
    E: torch.Tensor  # (N, m) sparse part
    dp: torch.Tensor  # (N, dof)
    singular_values: torch.Tensor  # (n,) of A, descending
    objective: float
    iters: int
    residual: float


def _eigh(Gm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` that falls back to LAPACK when cuSOLVER gives up.

    MNIST's always-black pixels make the Gram matrix exactly rank-deficient with
    many repeated zero eigenvalues; cuSOLVER's ``syevd`` then sometimes reports
    non-convergence (seen on an H200 for digits 0 and 9), LAPACK does not.
    """
    Gm = 0.5 * (Gm + Gm.T)
    try:
        return torch.linalg.eigh(Gm)
    except torch.linalg.LinAlgError:
        if Gm.device.type == "cpu":
            raise
        evals, V = torch.linalg.eigh(Gm.cpu())
        return evals.to(Gm.device), V.to(Gm.device)


def shrink_singular_values(X: torch.Tensor, tau: float, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Proximal map of ``tau * sum_{i > keep} sigma_i`` at ``X`` ``(N, m)``.

    ``keep = 0`` is singular value thresholding (nuclear norm); ``keep = r``
    leaves the ``r`` largest singular values untouched (PSSV). Computed from the
    eigendecomposition of the smaller Gram matrix in float64.

    Returns the shrunk matrix (dtype of ``X``) and its singular values, descending.
    """
    N, m = X.shape
    Xd = X.double()
    small_side_rows = N <= m
    Gm = Xd @ Xd.T if small_side_rows else Xd.T @ Xd  # (n, n)
    evals, V = _eigh(Gm)  # ascending
    evals, V = evals.flip(0), V.flip(1)
    s = evals.clamp_min(0).sqrt()
    s_new = (s - tau).clamp_min(0)
    if keep > 0:
        s_new[:keep] = s[:keep]
    f = torch.where(s > 0, s_new / s.clamp_min(1e-300), torch.zeros_like(s))
    nz = int((f > 0).sum())
    V, f = V[:, :nz], f[:nz]
    out = (V * f) @ (V.T @ Xd) if small_side_rows else (Xd @ V) * f @ V.T
    return out.to(X.dtype), s_new


def _spectral_norm(X: torch.Tensor, iters: int = 30) -> float:
    """Largest singular value of ``(N, m)`` by power iteration (no full SVD)."""
    v = torch.ones(X.shape[1], dtype=torch.float64, device=X.device) / math.sqrt(X.shape[1])
    Xd = X.double()
    s = 0.0
    for _ in range(iters):
        u = Xd @ v
        v = Xd.T @ u
        s = v.norm().item()
        if s == 0:
            return 0.0
        v = v / s
    return math.sqrt(s)


def rasl_inner(D: torch.Tensor, J: torch.Tensor, lam: float, *, keep: int = 0, rho: float = 1.5,
               max_iters: int = 50, tol: float = 1e-5) -> InnerResult:
    """The convex inner problem, by inexact ALM.

    ``min sum_{i>keep} sigma_i(A) + lam |E|_1  s.t.  D + [J_i dp_i] = A + E``.

    Args:
        D: ``(N, m)`` normalised warped images; J: ``(N, m, dof)``.
    """
    N, m = D.shape
    Jd = J.double()
    JtJ = Jd.transpose(1, 2) @ Jd  # (N, dof, dof)
    dof = J.shape[-1]
    eye = torch.eye(dof, dtype=torch.float64, device=D.device)
    tr = JtJ.diagonal(dim1=-2, dim2=-1).sum(-1)
    # A relative ridge: the normalisation's projection makes J rank-deficient
    # for some families and a blank image has J = 0.
    chol = torch.linalg.cholesky(JtJ + (1e-6 * tr / dof + 1e-12)[:, None, None] * eye)
    norm2 = max(_spectral_norm(D), 1e-12)
    normF = D.norm().item()
    Y = D / max(norm2, D.abs().max().item() / lam)  # dual start (Lin et al.)
    mu = 1.25 / norm2
    E = torch.zeros_like(D)
    Jdp = torch.zeros_like(D)
    dp = D.new_zeros(N, dof)
    s = D.new_zeros(0)
    it, res = 0, math.inf
    for it in range(1, max_iters + 1):
        A, s = shrink_singular_values(D + Jdp - E + Y / mu, 1.0 / mu, keep)
        T = D + Jdp - A + Y / mu
        E = torch.sign(T) * (T.abs() - lam / mu).clamp_min(0)
        rhs = torch.einsum("bmk,bm->bk", J, A + E - D - Y / mu).double()
        dp = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1).to(D.dtype)
        Jdp = torch.einsum("bmk,bk->bm", J, dp)
        Z = D + Jdp - A - E
        Y = Y + mu * Z
        mu *= rho
        res = Z.norm().item() / max(normF, 1e-12)
        if res < tol:
            break
    obj = float(s[keep:].sum()) + lam * float(E.abs().sum())
    return InnerResult(A, E, dp, s, obj, it, res)


class RASL:
    """RASL / PSSV as a registered alignment method."""

    name = "rasl"

    def __init__(self, config: RaslConfig | None = None, name: str = "rasl", **overrides):
        self.name = name
        self.config = C.merge_config(config or RaslConfig(), overrides, name)

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        """``images``: ``(N, C, H, W)`` in [0, 1] on the target device."""
        start = C.start_fit(self, images, ctx)
        cfg, family, rep, ckpt, M, step = start.cfg, start.family, start.rep, start.ckpt, start.M, start.step
        X, fill = start.prep.images, start.prep.fill  # (N, C, h, w), (N, C)
        lam = cfg.lam if cfg.lam is not None else 1.0 / math.sqrt(start.prep.m)
        notes = [f"lambda={lam:.4g}", f"fit size {start.prep.size[0]}x{start.prep.size[1]}",
                 "normalisation: exact Jacobian of v/|v|", "updates: forward compositional"]
        if start.resumed:
            notes.append(f"resumed from checkpoint at step {step}")
        for li, sigma in enumerate(cfg.levels):
            if li < start.start_level:
                continue
            fam = C.level_family(family, start.caps[li])
            Xl = L.gaussian_blur(X, sigma)
            grads = L.image_gradients(Xl)
            prev = math.inf
            for k in range(start.first_iter(li), start.budgets[li]):
                ctx.check_stop()
                lin = L.linearise(Xl, M, fam, normalise=True, fill=fill, grads=grads)
                inner = rasl_inner(lin.y, lin.jac, lam, keep=cfg.target_rank, rho=cfg.rho,
                                   max_iters=cfg.inner_max_iters, tol=cfg.inner_tol)
                dp = L.clip_step(inner.dp, fam, cfg.max_step)
                M = C.finite_or(L.compose_update(M, dp, fam), M)
                M = C.anchor(M, family, ctx.reference_index, cfg.center)
                step += 1
                rep.step(step, li, inner.objective, lin.raw.view_as(X), inner_iters=inner.iters,
                         inner_residual=inner.residual, rank=int((inner.singular_values > 0).sum()))
                ckpt.save(step, li, k + 1, {"M": M})
                if abs(prev - inner.objective) < cfg.outer_tol * max(abs(prev), 1e-12):
                    break
                prev = inner.objective
        aligner = self._aligner(X, M, family, fill, lam, cfg)
        if ctx.reference_index is not None:
            notes.append("output frame = the reference image's frame")
        elif not cfg.center:
            notes.append("frame not anchored (center=False)")
        return FitResult(M.float().cpu(), ctx.reference_index, aligner, rep.history, notes)

    def _aligner(self, X, M, family, fill, lam, cfg: RaslConfig) -> SubspaceAligner:
        """Basis of the low-rank component at the final warps, unblurred."""
        lin = L.linearise(X, M, family, normalise=True, fill=fill)
        inner = rasl_inner(lin.y, torch.zeros_like(lin.jac[:, :, :1]), lam, keep=cfg.target_rank,
                           rho=cfg.rho, max_iters=cfg.inner_max_iters, tol=cfg.inner_tol)
        rank = int((inner.singular_values > 1e-6 * inner.singular_values.max().clamp_min(1e-30)).sum())
        d = max(1, min(cfg.basis_rank, rank, X.shape[0]))
        U = C.orthonormal_basis(inner.A.T, d)  # (m, d)
        return SubspaceAligner(self.name, family, U, tuple(X.shape[1:]),
                               ApplyConfig(levels=cfg.levels, iters_per_level=cfg.apply_iters))


@register_method("rasl")
def create_rasl(**overrides) -> RASL:
    return RASL(RaslConfig(), "rasl", **overrides)


@register_method("pssv")
def create_pssv(**overrides) -> RASL:
    """PSSV: RASL with the partial sum of singular values above the target rank."""
    overrides.setdefault("target_rank", 1)
    return RASL(RaslConfig(), "pssv", **overrides)
