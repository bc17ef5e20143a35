"""Training a semantic pair model on a user's collection (images of one category, nothing more).

Two stages, both drawing their pairs from the collection alone:

1. *self-supervised* (the geometric-matching pretraining of Rocco et al.'s earlier CVPR 2017 work):
   an image and a random affine + TPS warp of it (with appearance changes) make a pair whose map is
   known; the loss is the mean distance between the predicted and the true source positions of a
   grid of target points, for the affine stage and for affine + TPS. It gives a feature extractor
   trained from scratch something to stand on (the paper starts from ImageNet features, which we
   never download).
2. *weakly supervised* (the paper; ``weak_steps``, 0 by default: see :class:`TrainConfig` and
   docs/semantic.md for what it measured): pairs of **different** images of the collection; the loss is
   minus the soft-inlier count of the affine map on the first correlation plus that of the TPS on
   the second (:func:`models.semantic.model.soft_inlier_count`). Half of each batch stays a
   synthetic pair of one image, scored by the same inlier count (no ground truth used), which keeps
   the features from drifting to matches that are consistent but wrong.

``fit_semantic`` returns the model; :func:`models.semantic.model.save_model` writes it with this
stage's config beside the weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..methods import Cancelled, Progress
from . import geometry as SG
from .model import SemanticConfig, SemanticModel, StageOutput, feature_cell_points, soft_inlier_count
from .synthetic import WarpSpec, appearance, random_warps, warp_images

__all__ = ["TrainConfig", "FitReport", "fit_semantic", "grid_loss"]


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; saved in the model's ``config.json`` under ``"train"``."""

    synthetic_steps: int = 600
    # Off by default: measured on MNIST 3 (docs/semantic.md), every variant of the weak stage tried
    # lowered both the synthetic pairs' PCK and the cross-instance agreement of the first stage's model.
    weak_steps: int = 0
    batch: int = 16
    lr: float = 1e-3
    weak_lr: float = 1e-4
    freeze_features: bool = False  # True: only the regression heads train (an operator's features kept)
    # How the weak stage scores its half of synthetic pairs: "inlier" (the soft-inlier count, no
    # ground truth) or "grid" (their known warps, as in the first stage).
    weak_synthetic: str = "inlier"
    weak_bn_frozen: bool = False  # the weak stage keeps the heads' batch-norm statistics
    warps: WarpSpec = field(default_factory=WarpSpec)
    seed: int = 0

    def __post_init__(self):
        if self.synthetic_steps < 0 or self.weak_steps < 0 or self.batch < 2 or self.lr <= 0 or self.weak_lr <= 0:
            raise ValueError(f"bad training config: steps must be >= 0, batch >= 2, learning rates > 0 "
                             f"(got synthetic_steps={self.synthetic_steps}, weak_steps={self.weak_steps}, "
                             f"batch={self.batch}, lr={self.lr}, weak_lr={self.weak_lr})")
        if self.weak_synthetic not in ("inlier", "grid"):
            raise ValueError(f"weak_synthetic must be 'inlier' or 'grid', not {self.weak_synthetic!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if isinstance(d.get("warps"), dict):
            d["warps"] = WarpSpec(**d["warps"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class FitReport:
    history: list[dict]
    seconds: float
    n_images: int


def grid_loss(model: SemanticModel, out, true_pts: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Mean distance (normalised units) between predicted and true source positions of ``pts``
    ``(B, N, 2)``, affine stage plus affine + TPS."""
    a = (model.map_points(out, pts, tps=False) - true_pts).norm(dim=-1).mean()
    if out.tps_dst is None:
        return a
    return a + (model.map_points(out, pts, tps=True) - true_pts).norm(dim=-1).mean()


def inlier_loss(model: SemanticModel, out) -> torch.Tensor:
    """Minus the soft-inlier counts of both stages (mean over the batch)."""
    g, B = model.cfg.grid, out.theta.shape[0]
    cells = feature_cell_points(g, g, B, like=out.theta)
    r = model.cfg.inlier_radius
    c = soft_inlier_count(out.corr_affine, SG.affine_points(out.theta, cells), r)
    if out.tps_dst is not None:
        c = c + soft_inlier_count(out.corr_tps, SG.tps_points(model.ctrl(cells), out.tps_dst, cells), r)
    return -c.mean()


def fit_semantic(images: torch.Tensor, cfg: SemanticConfig = SemanticConfig(), train: TrainConfig = TrainConfig(), *,
                 model: SemanticModel | None = None, progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[SemanticModel, FitReport]:
    """Train on ``images`` ``(N, C, H, W)`` float in [0, 1] (any size: resized to ``cfg.size``), on
    their device. ``model``: start from it (e.g. :meth:`SemanticModel.from_feature_file`)."""
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"training needs at least 2 images as (N, C, H, W), got {tuple(images.shape)}")
    t0 = time.time()
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    dev = images.device
    model = (model or SemanticModel(cfg)).to(dev).train()
    s = model.cfg.size
    # The [0, 1] images at the network's size (prepare() centres them later, after the appearance changes).
    x = torch.nn.functional.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True) \
        if tuple(images.shape[-2:]) != (s, s) else images
    N, report = x.shape[0], progress or (lambda p: None)
    pts = SG.base_grid((8, 8), like=x).reshape(1, 64, 2)
    total = train.synthetic_steps + train.weak_steps
    history = []
    if train.freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, train.synthetic_steps) / max(1, train.synthetic_steps))))
    step = 0

    def pair_batch(b: int):
        idx = torch.randint(N, (b,), generator=gen).to(dev)
        src = x[idx]
        w = random_warps(b, train.warps, like=src, generator=gen)
        tgt = appearance(warp_images(src, w), generator=gen)
        return src, tgt, w

    def log(stage: str, loss: float):
        if step % 25 == 0 or step == total:
            history.append({"step": step, "stage": stage, "loss": round(loss, 5), "seconds": round(time.time() - t0, 2)})
            report(Progress("training", step=step, total=total, loss=loss, message=stage))

    for _ in range(train.synthetic_steps):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        src, tgt, w = pair_batch(train.batch)
        out = model(src, tgt)
        loss = grid_loss(model, out, w.map_points(pts.expand(train.batch, -1, -1)), pts.expand(train.batch, -1, -1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        log("self-supervised", loss.item())
    for g in opt.param_groups:
        g["lr"] = train.weak_lr
    if train.weak_steps and train.weak_bn_frozen:
        # Fine-tuning on pairs unlike the first stage's: batch statistics of those would replace the
        # running ones the heads were trained with.
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
    half = train.batch // 2
    for _ in range(train.weak_steps):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        # Different instances: two independent draws (a draw of one image twice is rare and harmless).
        i = torch.randint(N, (train.batch - half,), generator=gen).to(dev)
        j = torch.randint(N, (train.batch - half,), generator=gen).to(dev)
        src2, tgt2 = x[i], appearance(x[j], strength=0.5, generator=gen)
        src1, tgt1, w1 = pair_batch(half)
        out = model(torch.cat([src1, src2]), torch.cat([tgt1, tgt2]))
        if train.weak_synthetic == "grid":
            cross = StageOutput(out.theta[half:], out.tps_dst[half:], out.corr_affine[half:], out.corr_tps[half:])
            own = StageOutput(out.theta[:half], out.tps_dst[:half], out.corr_affine[:half], out.corr_tps[:half])
            p = pts.expand(half, -1, -1)
            loss = inlier_loss(model, cross) + grid_loss(model, own, w1.map_points(p), p)
        else:
            loss = inlier_loss(model, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log("weakly supervised", loss.item())
    model.eval()
    return model, FitReport(history, time.time() - t0, N)
