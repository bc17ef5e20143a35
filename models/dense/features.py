"""Dense descriptors for the pseudo-correspondences, behind one interface.

A feature extractor maps images ``(B, 3, H, W)`` in [0, 1] to unit-length descriptors
``(B, D, h, w)`` on a grid whose cell centres are spread evenly over the image (normalised
coordinates of cell ``(i, j)``: the ``h x w`` :func:`models.dense.warps.identity_map`), so that
matches are read in the image's own frame whatever the stride.

* ``"hog"`` (weight-free, hand-made): multi-scale histograms of gradient orientation (8 bins,
  soft-assigned, magnitude-weighted, pooled by Gaussians at two scales over a 2 x 2 layout of cells,
  square-rooted and normalised like RootSIFT) plus blurred opponent colour. Needs no weights.
* ``"randconv"`` (weight-free, the method's default): a randomly initialised (seeded), never trained
  three-layer conv net; on the synthetic sets it matched more precisely than ``hog`` on two
  objects of three (docs/dense.md).
* ``"vit"``: a self-supervised ViT (DINO-style) whose weights an operator provides as a safetensors
  file (:mod:`models.dense.vit`); nothing is ever downloaded.

Device and dtype follow the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FEATURES", "FeatureConfig", "HogFeatures", "RandConvFeatures", "make_extractor"]

FEATURES = ("hog", "randconv", "vit")


@dataclass(frozen=True)
class FeatureConfig:
    kind: str = "randconv"
    stride: int = 2  # hog / randconv: descriptor grid = image size / stride
    vit_path: str | None = None  # vit: the operator's safetensors file
    vit_heads: int | None = None  # vit: attention heads (default: embedding dim / 64, at least 1)
    vit_layer: int = -1  # vit: which block's keys are the descriptor (-1: the last)
    seed: int = 0  # randconv: the random weights' seed

    def __post_init__(self):
        if self.kind not in FEATURES:
            raise ValueError(f"unknown feature extractor {self.kind!r}; choose one of {', '.join(FEATURES)}")
        if self.kind == "vit" and not self.vit_path:
            raise ValueError("feature extractor 'vit' needs vit_path: a safetensors file of the ViT's weights")


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with reflected borders."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _resample(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Read ``(B, C, H, W)`` at the ``h x w`` evenly spread cell centres (align_corners=True)."""
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


class HogFeatures(nn.Module):
    """Multi-scale gradient-orientation histograms + colour; no parameters."""

    bins = 8
    sigmas = (1.5, 3.0)  # pooling scales, pixels of the input
    colour_weight = 0.5

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, Wd = images.shape
        h, w = max(1, H // self.stride), max(1, Wd // self.stride)
        gray = images.mean(1, keepdim=True)
        gx = F.pad(gray, (1, 1, 0, 0), mode="replicate")
        gx = (gx[..., 2:] - gx[..., :-2]) / 2
        gy = F.pad(gray, (0, 0, 1, 1), mode="replicate")
        gy = (gy[..., 2:, :] - gy[..., :-2, :]) / 2
        mag = (gx ** 2 + gy ** 2 + 1e-12).sqrt()
        ang = torch.atan2(gy, gx)  # (B, 1, H, W)
        centres = torch.arange(self.bins, dtype=images.dtype, device=images.device) * (2 * math.pi / self.bins)
        d = torch.remainder(ang - centres.view(1, -1, 1, 1) + math.pi, 2 * math.pi) - math.pi
        soft = (1 - d.abs() / (2 * math.pi / self.bins)).clamp_min(0)  # linear vote into the 2 nearest bins
        hist = soft * mag  # (B, bins, H, W)
        parts = []
        for s in self.sigmas:
            pooled = _gauss_blur(hist, s)
            # A 2 x 2 layout of cells around each point, one sigma away: where things are, not only what.
            cells = [torch.roll(pooled, shifts=(dy, dx), dims=(2, 3))
                     for dy in (-round(s), round(s)) for dx in (-round(s), round(s))]
            desc = _resample(torch.cat(cells, 1), h, w)  # (B, 4 * bins, h, w)
            desc = desc.clamp_min(0).sqrt()  # RootSIFT: Hellinger instead of Euclid
            parts.append(F.normalize(desc, dim=1))
        r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
        opp = torch.cat([(r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6), (r + g + b) / math.sqrt(3)], 1)
        colour = _resample(_gauss_blur(opp, 2.0), h, w)
        desc = torch.cat(parts + [self.colour_weight * colour], 1)
        return F.normalize(desc, dim=1)


class RandConvFeatures(nn.Module):
    """Three randomly initialised conv layers (seeded, never trained)."""

    def __init__(self, stride: int = 2, seed: int = 0, width: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.stride = stride
        chans = (3, width, width, width)
        self.weights = nn.ParameterList()
        for cin, cout in zip(chans[:-1], chans[1:]):
            w = torch.randn(cout, cin, 3, 3, generator=gen) * math.sqrt(2.0 / (cin * 9))
            self.weights.append(nn.Parameter(w, requires_grad=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, Wd = images.shape
        x = images - 0.5
        for i, w in enumerate(self.weights):
            x = F.conv2d(x, w.to(x.dtype), padding=1)
            if i < len(self.weights) - 1:
                x = F.relu(x)
                x = F.avg_pool2d(x, 3, stride=1, padding=1)
        x = _resample(_gauss_blur(x, 1.5), max(1, H // self.stride), max(1, Wd // self.stride))
        return F.normalize(x, dim=1)


def make_extractor(cfg: FeatureConfig) -> nn.Module:
    """The extractor ``cfg`` names (in eval mode, on the CPU: move it with the images)."""
    if cfg.kind == "hog":
        return HogFeatures(cfg.stride).eval()
    if cfg.kind == "randconv":
        return RandConvFeatures(cfg.stride, cfg.seed).eval()
    from .vit import load_vit_features

    return load_vit_features(cfg.vit_path, heads=cfg.vit_heads, layer=cfg.vit_layer).eval()
