"""What ``congeal apply`` means for the baselines.

The baselines learn no network, but each ends with a model of the aligned
collection, and a new image is aligned to that model by the same linearised
per-image update the fit used, starting from the identity:

* **RASL, PSSV, t-GRASTA** -> :class:`SubspaceAligner`: an orthonormal basis
  ``U`` ``(m, d)`` of the aligned, unit-norm images (RASL/PSSV: the leading
  singular vectors of the final low-rank component ``A``; t-GRASTA: its
  tracked subspace). A new image is aligned by t-GRASTA's robust step,
  ``min |e|_1 s.t. y(M) + J dp = U w + e``, iterated coarse-to-fine with
  ``M <- M P(dp)``.
* **Least-squares congealing** -> :class:`TemplateAligner`: the final mean
  of the aligned images. A new image is aligned by inverse-compositional
  Gauss-Newton to that mean (Lucas-Kanade), coarse-to-fine.

Saved as ``config.json`` (``"method"``, ``"family"``, the fit size and the
aligner settings) plus ``aligner.safetensors`` (``basis`` or ``template``).
The new image must show the object roughly where the collection's inputs
showed it: the capture range is that of the fit (a few pixels at 28 px),
not a re-fit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.methods import register_aligner

from . import _common as C
from . import linearise as L

__all__ = ["ApplyConfig", "SubspaceAligner", "TemplateAligner"]


@dataclass(frozen=True)
class ApplyConfig:
    """How a saved baseline aligns a new image."""

    levels: tuple[float, ...] = (2.0, 1.0, 0.0)  # blur sigmas in fit-size pixels
    iters_per_level: int = 10
    admm_iters: int = 25  # subspace aligners only
    normalise: bool = True  # subspace aligners: unit-norm images, as in the fit
    basis_blur: float = 0.0  # blur (px) of the images the basis was learned from (t-GRASTA: its last level)


def _to_fit_size(images: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    x = images.to(dtype)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _write(model_dir: Path, method: str, family: str, shape, cfg: ApplyConfig, tensors: dict) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "family": family, "shape": list(shape), "apply": C.config_to_json(cfg),
            "format": "congeal-baseline-1"}
    (model_dir / "config.json").write_text(json.dumps(meta, indent=1))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
              str(model_dir / "aligner.safetensors"))


def _read(model_dir: Path, device) -> tuple[dict, ApplyConfig, dict]:
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    cfg = C.merge_config(ApplyConfig(), meta.get("apply", {}), str(model_dir / "config.json"))
    tensors = {k: v.to(device) for k, v in load_file(str(model_dir / "aligner.safetensors")).items()}
    return meta, cfg, tensors


class SubspaceAligner:
    """Align new images to a learned subspace (RASL, PSSV, t-GRASTA)."""

    def __init__(self, method: str, family: str, basis: torch.Tensor, shape: tuple[int, int, int],
                 cfg: ApplyConfig = ApplyConfig()):
        self.method, self.family, self.cfg = method, family, cfg
        self.basis = basis  # (m, d), orthonormal columns
        self.shape = tuple(int(s) for s in shape)  # (C, h, w) fit size

    def align(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 3, 3)`` ``in_from_out_norm`` (on the images' device)."""
        C_, h, w = self.shape
        if images.ndim != 4 or images.shape[1] != C_:
            raise ValueError(f"{self.method} aligner expects (B, {C_}, H, W) images, got {tuple(images.shape)}")
        x = _to_fit_size(images, (h, w), self.basis.dtype)
        fill = L.border_fill(x)
        U0 = self.basis.to(x.device)
        M = C.identity(x.shape[0], x)
        for sigma in self.cfg.levels:
            # Compare like with like: blurring a basis of sigma_b-blurred images
            # by sqrt(s^2 - sigma_b^2) gives a basis of s-blurred images.
            s_img = max(sigma, self.cfg.basis_blur)
            xs = L.gaussian_blur(x, s_img)
            grads = L.image_gradients(xs)
            U = C.blur_basis(U0, self.shape, math.sqrt(max(s_img ** 2 - self.cfg.basis_blur ** 2, 0.0)))
            for _ in range(self.cfg.iters_per_level):
                lin = L.linearise(xs, M, self.family, normalise=self.cfg.normalise, fill=fill, grads=grads)
                step = C.robust_subspace_step(lin.y, lin.jac, U, iters=self.cfg.admm_iters)
                M = C.finite_or(L.compose_update(M, step.dp, self.family), M)
        return M

    def save(self, model_dir: Path) -> None:
        _write(model_dir, self.method, self.family, self.shape, self.cfg, {"basis": self.basis})

    @classmethod
    def load(cls, model_dir: Path, device) -> "SubspaceAligner":
        meta, cfg, t = _read(model_dir, device)
        return cls(meta["method"], meta["family"], t["basis"], tuple(meta["shape"]), cfg)


class TemplateAligner:
    """Align new images to the learned mean by inverse-compositional Gauss-Newton (LSC)."""

    def __init__(self, method: str, family: str, template: torch.Tensor, cfg: ApplyConfig = ApplyConfig()):
        self.method, self.family, self.cfg = method, family, cfg
        self.template = template  # (C, h, w)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.template.shape)

    def align(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 3, 3)`` ``in_from_out_norm`` (on the images' device)."""
        C_, h, w = self.shape
        if images.ndim != 4 or images.shape[1] != C_:
            raise ValueError(f"{self.method} aligner expects (B, {C_}, H, W) images, got {tuple(images.shape)}")
        x = _to_fit_size(images, (h, w), self.template.dtype)
        fill = L.border_fill(x)
        T0 = self.template.to(x.device)[None]
        M = C.identity(x.shape[0], x)
        for sigma in self.cfg.levels:
            xs = L.gaussian_blur(x, sigma)
            T = L.gaussian_blur(T0, sigma)
            sd, Hinv = steepest_descent(T, self.family)
            for _ in range(self.cfg.iters_per_level):
                err = L.warp_flat(xs, M, fill) - T.flatten(1)  # (B, m)
                dp = (err @ sd) @ Hinv.T  # (B, dof)
                M = C.finite_or(L.compose_update(M, dp, self.family, inverse=True), M)
        return M

    def save(self, model_dir: Path) -> None:
        _write(model_dir, self.method, self.family, self.shape, self.cfg, {"template": self.template})

    @classmethod
    def load(cls, model_dir: Path, device) -> "TemplateAligner":
        meta, cfg, t = _read(model_dir, device)
        return cls(meta["method"], meta["family"], t["template"], cfg)


def steepest_descent(template: torch.Tensor, family: str, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-compositional steepest-descent images and inverse Hessian of a template.

    ``template``: ``(1, C, h, w)``. Returns ``sd`` ``(m, dof)`` (``grad T . dW/dp`` at
    the identity) and ``H^-1`` ``(dof, dof)``, ``H = sd^T sd``; both shared by every
    image, which is what makes LSC cheap per image.
    """
    _, C_, h, w = template.shape
    eye = torch.eye(3, dtype=template.dtype, device=template.device)[None]
    lin = L.linearise(template, eye, family, normalise=False)
    sd = lin.jac[0]  # (m, dof)
    H = sd.T @ sd
    Hinv = L.safe_solve(H[None], torch.eye(H.shape[0], dtype=H.dtype, device=H.device)[None], ridge)[0]
    return sd, Hinv


for _name in ("rasl", "pssv", "tgrasta"):
    register_aligner(_name)(SubspaceAligner.load)
register_aligner("lsc")(TemplateAligner.load)
