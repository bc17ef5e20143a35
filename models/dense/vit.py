"""A plain ViT feature extractor whose weights come from an operator's safetensors file.

ASIC takes its pseudo-correspondences from DINO ViT features. We never download weights: the
operator converts a checkpoint to safetensors (tensor names as DINO's and timm's ``VisionTransformer``:
``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``, ``norm.{weight,bias}``)
and names the file. The architecture is read off the tensors' shapes (width, depth, patch size,
MLP width); only the number of heads cannot be, and defaults to width / 64 (ViT-S/B's). The
descriptor is the chosen block's attention *keys* of the patch tokens (heads concatenated), as
in ASIC and DINO-ViT-features, unit-normalised.

Images are resized to ``input_size`` (a multiple of the patch) and normalised with ImageNet
statistics; the position embedding is interpolated (bicubic) when the token grid differs from
the one it was trained on. Output: ``(B, D, n, n)`` read at evenly spread points (see
:mod:`models.dense.features`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..imageio import InputError
from .warps import identity_map

__all__ = ["ViT", "ViTFeatures", "load_vit_features", "vit_state_dict_shapes"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, D / heads)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x, k


class ViT(nn.Module):
    """The encoder only (no head): patch embedding, class token, position embedding, blocks."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, grid: int, hidden: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not a multiple of {heads} heads")
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def _pos(self, n: int) -> torch.Tensor:
        cls, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(round(math.sqrt(pos.shape[1])))
        if g != n:
            pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(n, n), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, n * n, -1)
        return torch.cat([cls, pos], 1)

    def keys(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images -> block ``layer``'s patch keys ``(B, D, n, n)``."""
        t = self.patch_embed.proj(x)  # (B, D, n, n)
        B, D, n, _ = t.shape
        t = t.flatten(2).transpose(1, 2)  # (B, n*n, D)
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], 1) + self._pos(n)
        stop = layer % len(self.blocks)
        for i, blk in enumerate(self.blocks):
            t, k = blk(t)
            if i == stop:
                break
        k = k[:, :, 1:].permute(0, 1, 3, 2).reshape(B, D, n, n)  # (B, heads * D/heads, n, n)
        return k


class ViTFeatures(nn.Module):
    def __init__(self, vit: ViT, input_size: int = 224, layer: int = -1):
        super().__init__()
        self.vit = vit
        self.input_size = input_size - input_size % vit.patch
        self.layer = layer
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        k = self.vit.keys(x, self.layer)  # (B, D, n, n), token (i, j) centred at -1 + (2 j + 1) / n
        n = k.shape[-1]
        # Re-read at evenly spread points (the extractors' common grid): token centres are not.
        grid = identity_map(n, n, like=k).expand(k.shape[0], -1, -1, -1)
        k = F.grid_sample(k, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return F.normalize(k, dim=1)


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def vit_state_dict_shapes(tensors: dict[str, torch.Tensor]) -> dict:
    """Architecture read off the tensors: width, depth, patch, grid, hidden; ``InputError`` naming
    what is missing."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise InputError(f"not a ViT weights file: no {', '.join(missing)} (expected DINO/timm tensor names)")
    w = tensors["patch_embed.proj.weight"]
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := _BLOCK.match(k))), default=-1)
    if depth < 1:
        raise InputError("not a ViT weights file: no blocks.0.* tensors")
    grid2 = tensors["pos_embed"].shape[1] - 1
    grid = int(round(math.sqrt(grid2)))
    if grid * grid != grid2:
        raise InputError(f"pos_embed holds {grid2} patch positions: not a square grid")
    return {"dim": int(w.shape[0]), "depth": depth, "patch": int(w.shape[-1]), "grid": grid,
            "hidden": int(tensors["blocks.0.mlp.fc1.weight"].shape[0])}


def load_vit_features(path: str | Path, *, heads: int | None = None, layer: int = -1,
                      input_size: int | None = None) -> ViTFeatures:
    """The extractor for a safetensors file of ViT weights (read on the CPU, never pickled).
    ``input_size`` defaults to the grid it was trained on (pos_embed) times the patch."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ViT weights file {path} does not exist")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure is the operator's file, said as such
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in tensors.items()}
    shp = vit_state_dict_shapes(tensors)
    heads = heads or max(1, shp["dim"] // 64)
    vit = ViT(shp["dim"], shp["depth"], heads, shp["patch"], shp["grid"], shp["hidden"])
    own = vit.state_dict()
    wanted = {k: v for k, v in tensors.items() if k in own}
    absent = sorted(set(own) - set(wanted))
    if absent:
        raise InputError(f"{path}: ViT weights lack {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    bad = [k for k in wanted if wanted[k].shape != own[k].shape]
    if bad:
        raise InputError(f"{path}: tensor {bad[0]} has shape {tuple(wanted[bad[0]].shape)}, "
                         f"expected {tuple(own[bad[0]].shape)}")
    vit.load_state_dict({k: v.float() for k, v in wanted.items()})
    return ViTFeatures(vit, input_size or shp["grid"] * shp["patch"], layer)
