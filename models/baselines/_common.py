"""Plumbing shared by the baselines: configs, the coarse-to-fine schedule,
frame anchoring, progress, checkpoints and the robust subspace step.

Private to :mod:`models.baselines`; the public pieces are re-exported there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import geometry as G
from models import metrics as MT
from models.methods import FitContext, Progress

from . import linearise as L

__all__: list[str] = []  # private module


# --------------------------------------------------------------------------- configs

def merge_config(cfg, overrides: dict[str, Any] | None, where: str):
    """``dataclasses.replace`` with JSON-friendly coercion and a clear error on unknown keys."""
    if not overrides:
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    clean = {}
    for k, v in overrides.items():
        cur = getattr(cfg, k)
        if isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        elif isinstance(cur, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        clean[k] = v
    return dataclasses.replace(cfg, **clean)


def config_to_json(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def level_family(requested: str, cap: str | None) -> str:
    """The less general of the requested family and a level's cap (warp curriculum)."""
    req = G.get_family(requested)
    if cap is None:
        return requested
    c = G.get_family(cap)
    return c.name if c.rank < req.rank else req.name


def level_caps(caps: tuple, n_levels: int) -> list:
    """Per-level family caps, padded with ``None`` (no cap) to the number of levels."""
    caps = list(caps or ())
    return (caps + [None] * n_levels)[:n_levels]


def level_budgets(total: int, n_levels: int) -> list[int]:
    """Split ``total`` outer iterations over the pyramid levels, the finest getting the remainder."""
    total = max(int(total), n_levels)
    base = total // n_levels
    out = [base] * n_levels
    out[-1] += total - base * n_levels
    return out


# --------------------------------------------------------------------------- data

@dataclass
class Prepared:
    """The collection as the baselines fit it.

    ``images``: ``(N, C, h, w)`` at the fit size (``max_side``), on the input's device;
    ``fill``: ``(N, C)`` per-image background (border median).
    """

    images: torch.Tensor
    fill: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def m(self) -> int:
        return self.images[0].numel()


def prepare(images: torch.Tensor, max_side: int | None) -> Prepared:
    """Fit-size copy of ``(N, C, H, W)`` images; float32/float64 inputs keep their dtype
    (half precision is promoted: the Gauss-Newton steps need the mantissa)."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    x = L.resize_max_side(images.to(dtype), max_side)
    return Prepared(x, L.border_fill(x))


def identity(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device).expand(n, 3, 3).clone()


def anchor(M: torch.Tensor, family: str, reference: int | None, center: bool) -> torch.Tensor:
    """Fix the collection's free common transform.

    With a reference image its frame becomes the output frame (``M_ref = I``);
    otherwise, when ``center`` is set, the mean parameters are pinned at zero.
    """
    if reference is not None:
        out = M @ torch.linalg.inv(M[reference:reference + 1])
        return out / out[:, 2:3, 2:3]
    return L.center_warps(M, family) if center else M


def finite_or(M: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Replace any non-finite or near-singular warp by ``fallback`` (its previous value)."""
    det = torch.linalg.det(M[:, :2, :2])
    ok = torch.isfinite(M).all(dim=(1, 2)) & (det.abs() > 1e-3)
    return torch.where(ok[:, None, None], M, fallback)


# --------------------------------------------------------------------------- reporting

class Reporter:
    """History rows, progress reports and the ETA for one fit."""

    def __init__(self, ctx: FitContext, total: int):
        self.ctx, self.total, self.t0 = ctx, max(1, total), time.time()
        self.history: list[dict] = []

    def step(self, step: int, level: int, loss: float, warped: torch.Tensor, **extra) -> None:
        """``warped``: ``(N, C, H, W)`` in [0, 1] at the current warps (for APSNR)."""
        a = MT.apsnr(warped.clamp(0, 1)) if warped.shape[0] > 1 else None
        a = None if a is not None and not math.isfinite(a) else a
        el = time.time() - self.t0
        eta = el / max(step, 1) * max(self.total - step, 0)
        row = {"step": step, "level": level, "loss": float(loss), "apsnr": a, "seconds": round(el, 3)}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in extra.items()})
        self.history.append(row)
        self.ctx.report(Progress("training", step=step, total=self.total, loss=float(loss), apsnr=a, eta_s=eta))


# --------------------------------------------------------------------------- checkpoints

class Checkpoint:
    """Warps (and any state tensors) after each outer iteration, so a restarted job resumes.

    Cheap: ``N x 9`` floats plus the method's small state. A checkpoint from a
    different collection size, method or warp family is ignored.
    """

    def __init__(self, ctx: FitContext, method: str, n: int, family: str):
        self.dir = Path(ctx.checkpoint_dir) if ctx.checkpoint_dir else None
        self.method, self.n, self.family = method, n, family

    @property
    def _paths(self) -> tuple[Path, Path]:
        return self.dir / f"{self.method}_state.safetensors", self.dir / f"{self.method}_state.json"

    def save(self, step: int, level: int, level_step: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        ts, js = self._paths
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(ts) + ".tmp")
        os.replace(str(ts) + ".tmp", ts)
        meta = {"method": self.method, "n": self.n, "family": self.family, "step": step,
                "level": level, "level_step": level_step}
        js.with_suffix(".json.tmp").write_text(json.dumps(meta))
        os.replace(js.with_suffix(".json.tmp"), js)

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if self.dir is None:
            return None
        ts, js = self._paths
        if not (ts.is_file() and js.is_file()):
            return None
        try:
            meta = json.loads(js.read_text())
            tensors = load_file(str(ts))
        except (OSError, ValueError):
            return None
        if (meta.get("method"), meta.get("n"), meta.get("family")) != (self.method, self.n, self.family):
            return None
        return meta, tensors


# --------------------------------------------------------------------------- one fit's start

@dataclass
class FitStart:
    """What every baseline fit begins with: its config, the prepared collection, the
    coarse-to-fine schedule, progress and checkpoint plumbing, and where to resume.

    ``M``: ``(N, 3, 3)`` warps at the fit size (the checkpoint's, or the identity);
    ``saved``: the checkpoint's other tensors (a method's own state), on the images' device.
    """

    cfg: Any
    family: str
    prep: Prepared
    budgets: list[int]
    caps: list
    rep: Reporter
    ckpt: Checkpoint
    M: torch.Tensor
    start_level: int = 0
    start_iter: int = 0
    step: int = 0
    resumed: bool = False
    saved: dict = dataclasses.field(default_factory=dict)

    def first_iter(self, level: int) -> int:
        """Where level ``level``'s loop starts (the checkpoint's position on its own level)."""
        return self.start_iter if level == self.start_level else 0


def start_fit(method, images: torch.Tensor, ctx: FitContext) -> FitStart:
    """``method`` has ``name`` and ``config`` (with ``max_side``, ``max_iters``, ``levels``,
    ``level_caps``); ``ctx.options`` override the config for this fit."""
    cfg = merge_config(method.config, ctx.options, method.name)
    G.get_family(ctx.warp)
    prep = prepare(images, cfg.max_side)
    n = prep.images.shape[0]
    budget = ctx.budget if ctx.budget is not None else cfg.max_iters
    budgets = level_budgets(budget, len(cfg.levels))
    st = FitStart(cfg, ctx.warp, prep, budgets, level_caps(cfg.level_caps, len(cfg.levels)),
                  Reporter(ctx, sum(budgets)), Checkpoint(ctx, method.name, n, ctx.warp),
                  identity(n, prep.images))
    if (got := st.ckpt.load()) is not None:
        meta, t = got
        st.M = t.pop("M").to(prep.images)
        st.start_level, st.start_iter, st.step = meta["level"], meta["level_step"], meta["step"]
        st.saved = {k: v.to(prep.images) for k, v in t.items()}
        st.resumed = True
    return st


# --------------------------------------------------------------------------- robust subspace step

@dataclass
class SubspaceStep:
    """Result of :func:`robust_subspace_step` for a batch of ``B`` images."""

    dp: torch.Tensor  # (B, dof) warp update
    w: torch.Tensor  # (B, d) subspace coefficients
    e: torch.Tensor  # (B, m) sparse error
    dual: torch.Tensor  # (B, m) final Lagrange multipliers
    residual: torch.Tensor  # (B,) |y + J dp - U w - e| / |y|


def robust_subspace_step(y: torch.Tensor, jac: torch.Tensor, U: torch.Tensor, *, iters: int,
                         rho0: float = 1.25, growth: float = 1.5, ridge: float = 1e-6) -> SubspaceStep:
    """Per image ``min |e|_1  s.t.  y + J dp = U w + e`` by ADMM (t-GRASTA's inner problem).

    ``U`` is ``(m, d)`` with orthonormal columns, so the ``w`` step is a
    projection. The penalty ``rho`` starts where the shrinkage threshold
    ``1/rho`` exceeds every pixel (all residual is explained by ``U`` and
    ``dp`` first) and grows geometrically, as in Lin et al.'s inexact ALM.

    Args:
        y: ``(B, m)`` warped (normalised) images; ``jac``: ``(B, m, dof)``.
    """
    B, m = y.shape
    JtJ = jac.double().transpose(1, 2) @ jac.double()  # (B, dof, dof)
    e = torch.zeros_like(y)
    lam = torch.zeros_like(y)
    Jdp = torch.zeros_like(y)
    dp = y.new_zeros(B, jac.shape[-1])
    rho = rho0 / y.norm(dim=1).clamp_min(1e-12).mean().item()
    w = y @ U
    for _ in range(iters):
        v = y + Jdp
        w = (v - e + lam / rho) @ U  # (B, d)
        Uw = w @ U.T  # (B, m)
        t = v - Uw + lam / rho
        e = torch.sign(t) * (t.abs() - 1.0 / rho).clamp_min(0)
        rhs = torch.einsum("bmk,bm->bk", jac, Uw + e - y - lam / rho)
        dp = L.safe_solve(JtJ, rhs.unsqueeze(-1), ridge).squeeze(-1)
        Jdp = torch.einsum("bmk,bk->bm", jac, dp)
        h = y + Jdp - Uw - e
        lam = lam + rho * h
        rho *= growth
    res = (y + Jdp - w @ U.T - e).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)
    return SubspaceStep(dp, w, e, lam, res)


def orthonormal_basis(X: torch.Tensor, d: int) -> torch.Tensor:
    """Top-``d`` left singular vectors of ``X`` ``(m, n)`` as ``(m, d)``, padded with random directions."""
    m = X.shape[0]
    U, S, _ = torch.linalg.svd(X.double(), full_matrices=False)
    U = U[:, :d]
    if U.shape[1] < d:
        g = torch.Generator(device="cpu").manual_seed(0)
        extra = torch.randn(m, d - U.shape[1], generator=g, dtype=torch.float64).to(U.device)
        U, _ = torch.linalg.qr(torch.cat([U, extra], dim=1))
    return U.to(X.dtype)


def blur_basis(U: torch.Tensor, shape: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Span of the blurred basis images, re-orthonormalised: ``(m, d) -> (m, d)``.

    Blur is linear, so blurring aligned images of the subspace stays in the
    span of the blurred basis; used to align new images coarse-to-fine.
    """
    if sigma <= 0:
        return U
    C, H, W = shape
    b = L.gaussian_blur(U.T.reshape(-1, C, H, W), sigma).reshape(U.shape[1], -1).T
    Q, _ = torch.linalg.qr(b.double())
    return Q.to(U.dtype)
