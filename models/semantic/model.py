"""The network of weakly supervised semantic alignment (Rocco, Arandjelovic and Sivic, CVPR 2018).

Siamese features -> dense normalised correlation -> a regression CNN for an affine map; the
source resampled by it -> features again -> correlation -> a second regression CNN for a thin-plate
spline. The soft-inlier count (:func:`soft_inlier_count`) scores a map against a correlation
differentiably, and is the weakly supervised loss (:mod:`models.semantic.train`).

Every map is a backward map target -> source in normalised coordinates
(:mod:`models.semantic.geometry`). Feature grids are treated as images of their own with the same
convention (cell ``0`` at -1, the last cell at +1), in the source and the target alike, so the
identity map scores the identity correspondence.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import geometry as SG

__all__ = ["SemanticConfig", "ConvFeatures", "normalised_correlation", "RegressionHead", "SemanticModel",
           "StageOutput", "soft_inlier_count", "match_share", "feature_cell_points", "save_model", "load_model", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "semantic.safetensors"


@dataclass(frozen=True)
class SemanticConfig:
    """The network's shape; saved as ``config.json`` beside ``semantic.safetensors``."""

    size: int = 48  # images are resized to size x size before the network (flows are normalised: any size)
    in_channels: int = 1  # 1: luminance; 3: RGB (grey images are repeated)
    channels: tuple[int, ...] = (32, 32, 32)  # the default extractor's layers (3x3 convolutions)
    strides: tuple[int, ...] = (2, 1, 2)
    features: str = "scratch"  # "scratch", or the safetensors file the features were initialised from
    head_channels: tuple[int, int] = (64, 32)
    tps_grid: int = 3  # control points per side
    inlier_radius: int = 1  # feature cells of tolerance of the soft-inlier mask
    method: str = "semantic"

    def __post_init__(self):
        if self.size < 16 or self.in_channels not in (1, 3) or self.tps_grid < 2 or self.inlier_radius < 0:
            raise ValueError(f"bad semantic config: size={self.size}, in_channels={self.in_channels}, "
                             f"tps_grid={self.tps_grid}, inlier_radius={self.inlier_radius}")
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("channels and strides give one entry per feature layer")

    @property
    def stride(self) -> int:
        s = 1
        for v in self.strides:
            s *= v
        return s

    @property
    def grid(self) -> int:
        """Feature cells per side."""
        g = self.size
        for s in self.strides:
            g = (g + 2 - 3) // s + 1
        return g

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["strides"], d["head_channels"] = list(self.channels), list(self.strides), list(self.head_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SemanticConfig":
        d = dict(d)
        for k in ("channels", "strides", "head_channels"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class ConvFeatures(nn.Module):
    """The siamese feature extractor: 3x3 convolutions (padding 1), ReLU between, ``(B, C, H, W)`` ->
    ``(B, d, h, w)``. The default is trained from scratch; :meth:`from_safetensors` builds one from an
    operator's file whose tensors are ``conv{i}.weight`` ``(out, in, 3, 3)`` and ``conv{i}.bias`` and
    whose metadata holds ``"strides"`` (comma separated): nothing is downloaded."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], strides: tuple[int, ...]):
        super().__init__()
        c, layers = in_channels, []
        for i, (o, s) in enumerate(zip(channels, strides)):
            layers.append(nn.Conv2d(c, o, 3, stride=s, padding=1))
            c = o
        self.convs = nn.ModuleList(layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x

    def named_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, conv in enumerate(self.convs):
            out[f"conv{i}.weight"], out[f"conv{i}.bias"] = conv.weight, conv.bias
        return out

    def save_safetensors(self, path: str | Path) -> None:
        """The operator format of :meth:`from_safetensors`."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.named_weights().items()}, str(path),
                  metadata={"strides": ",".join(str(c.stride[0]) for c in self.convs)})

    @staticmethod
    def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[int, ...], tuple[int, ...], int]:
        """``(tensors, channels, strides, in_channels)`` of an operator's file; ``ValueError`` names what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such feature weights file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        n = 0
        while f"conv{n}.weight" in tensors:
            n += 1
        if n == 0:
            raise ValueError(f"{path}: no conv0.weight: expected conv{{i}}.weight / conv{{i}}.bias tensors")
        try:
            strides = tuple(int(s) for s in meta.get("strides", "").split(","))
        except ValueError:
            raise ValueError(f"{path}: metadata 'strides' must be comma-separated integers") from None
        if len(strides) != n:
            raise ValueError(f"{path}: {n} conv layers but {len(strides)} strides in the metadata")
        chans, c_in = [], None
        for i in range(n):
            w, b = tensors[f"conv{i}.weight"], tensors.get(f"conv{i}.bias")
            if w.ndim != 4 or tuple(w.shape[2:]) != (3, 3) or b is None or b.shape != (w.shape[0],):
                raise ValueError(f"{path}: conv{i} must be a (out, in, 3, 3) weight with an (out,) bias")
            if i == 0:
                c_in = int(w.shape[1])
            elif w.shape[1] != chans[-1]:
                raise ValueError(f"{path}: conv{i} takes {w.shape[1]} channels, conv{i - 1} gives {chans[-1]}")
            chans.append(int(w.shape[0]))
        if c_in not in (1, 3):
            raise ValueError(f"{path}: conv0 takes {c_in} channels; 1 (grey) or 3 (RGB) expected")
        return tensors, tuple(chans), strides, c_in

    def load_named(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.named_weights().items():
                p.copy_(tensors[k].to(p.dtype))


def normalised_correlation(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's normalised correlation of source features ``fs`` and target features ``ft``, both
    ``(B, d, h, w)`` -> ``(B, hs * ws, ht, wt)``: channel ``i * ws + j`` at target cell ``(k, l)`` is

        s_ijkl = <f^s_ij, f^t_kl> / sqrt(sum_ab <f^s_ab, f^t_kl>^2)

    with features L2-normalised per cell first, and negative similarities set to 0 before the
    normalisation: they are not matches, and the soft-inlier count sums scores. The denominator
    down-weighs a target feature that matches many source cells (an ambiguous match)."""
    B, d, hs, ws = fs.shape
    ht, wt = ft.shape[-2:]
    fs = F.normalize(fs, dim=1, eps=eps).reshape(B, d, hs * ws)
    ft = F.normalize(ft, dim=1, eps=eps).reshape(B, d, ht * wt)
    s = F.relu(fs.transpose(1, 2) @ ft)  # (B, hs * ws, ht * wt)
    s = s / torch.sqrt((s ** 2).sum(dim=1, keepdim=True) + eps)
    return s.reshape(B, hs * ws, ht, wt)


class RegressionHead(nn.Module):
    """Correlation ``(B, hs * ws, ht, wt)`` -> ``(B, n_out)``; the last layer starts at zero, so the
    warp it parametrises starts at the identity."""

    def __init__(self, grid: int, channels: tuple[int, int], n_out: int):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(grid * grid, c1, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.out = nn.Linear(c2 * grid * grid, n_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, corr: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(corr)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.out(x.flatten(1))


@dataclass
class StageOutput:
    """One forward pass. ``theta`` ``(B, 2, 3)``: target -> source affine; ``tps_dst`` ``(B, K, 2)``:
    target -> affine-warped-source spline; ``corr_affine`` / ``corr_tps``: the correlations each
    head saw ``(B, h * h, h, h)``."""

    theta: torch.Tensor
    tps_dst: torch.Tensor | None
    corr_affine: torch.Tensor
    corr_tps: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


class SemanticModel(nn.Module):
    """Affine then TPS, from two images ``(B, C, H, W)`` in [0, 1] (any size: resized to ``cfg.size``)."""

    def __init__(self, cfg: SemanticConfig = SemanticConfig(), features: ConvFeatures | None = None):
        super().__init__()
        self.cfg = cfg
        self.features = features or ConvFeatures(cfg.in_channels, cfg.channels, cfg.strides)
        g = cfg.grid
        self.affine_head = RegressionHead(g, cfg.head_channels, 6)
        self.tps_head = RegressionHead(g, cfg.head_channels, 2 * cfg.tps_grid ** 2)

    @classmethod
    def from_feature_file(cls, path: str | Path, **overrides) -> "SemanticModel":
        """The extractor's shape and initial weights from an operator's safetensors file."""
        tensors, chans, strides, c_in = ConvFeatures.read_safetensors(path)
        cfg = SemanticConfig(**{**overrides, "channels": chans, "strides": strides, "in_channels": c_in,
                                "features": str(path)})
        model = cls(cfg)
        model.features.load_named(tensors)
        return model

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, cfg.in_channels, size, size)``, zero-mean per image."""
        if x.shape[1] == 3 and self.cfg.in_channels == 1:
            x = (x * x.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
        elif x.shape[1] == 1 and self.cfg.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        s = self.cfg.size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x - x.mean(dim=(1, 2, 3), keepdim=True)

    def ctrl(self, like: torch.Tensor) -> torch.Tensor:
        return SG.tps_control_points(self.cfg.tps_grid, like=like)

    def forward(self, source: torch.Tensor, target: torch.Tensor, tps: bool = True) -> StageOutput:
        """``source``, ``target`` ``(B, C, H, W)`` -> :class:`StageOutput` (``tps=False``: the affine stage only)."""
        src, tgt = self.prepare(source), self.prepare(target)
        ft = self.features(tgt)
        c1 = normalised_correlation(self.features(src), ft)
        theta = SG.identity_affine(src.shape[0], like=src) + self.affine_head(c1).view(-1, 2, 3)
        if not tps:
            return StageOutput(theta, None, c1)
        s = self.cfg.size
        warped = SG.sample(src, SG.affine_grid(theta, (s, s)))
        c2 = normalised_correlation(self.features(warped), ft)
        dst = self.ctrl(src)[None] + self.tps_head(c2).view(src.shape[0], -1, 2)
        return StageOutput(theta, dst, c1, c2)

    def map_points(self, out: StageOutput, pts: torch.Tensor, tps: bool = True) -> torch.Tensor:
        """Target points ``(B, N, 2)`` normalised -> source points: ``theta(tps(p))``."""
        if tps and out.tps_dst is not None:
            pts = SG.tps_points(self.ctrl(pts), out.tps_dst.to(pts.dtype), pts)
        return SG.affine_points(out.theta.to(pts.dtype), pts)

    def flow(self, out: StageOutput, size: tuple[int, int], tps: bool = True) -> torch.Tensor:
        """``(B, H, W, 2)`` normalised source positions of every target pixel of an ``(H, W)`` target."""
        B, (H, W) = out.theta.shape[0], size
        p = SG.base_grid(size, like=out.theta).reshape(1, H * W, 2).expand(B, -1, -1)
        return self.map_points(out, p, tps).reshape(B, H, W, 2)


def feature_cell_points(h: int, w: int, batch: int, *, like: torch.Tensor) -> torch.Tensor:
    """``(batch, h * w, 2)`` normalised centres of a feature grid's cells, row-major (the order of the
    correlation's target cells)."""
    return SG.base_grid((h, w), like=like).reshape(1, h * w, 2).expand(batch, -1, -1)


def soft_inlier_count(corr: torch.Tensor, src_pts: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """The differentiable soft-inlier count: for each target cell ``(k, l)``, the sum of its match
    scores ``s_ijkl`` over the source cells within ``radius`` cells of where the map sends it (the
    RANSAC inlier mask of tolerance ``radius``, a box around the mapped point), read bilinearly at
    the mapped point so the count has a gradient with respect to the map.

    ``corr`` ``(B, hs * ws, ht, wt)`` (:func:`normalised_correlation`), ``src_pts`` ``(B, ht * wt, 2)``
    normalised source positions of the target cells (row-major) -> ``(B,)``: the mean over target
    cells (a cell mapped outside the source scores 0)."""
    B, _, ht, wt = corr.shape
    hs = ws = int(round((corr.shape[1]) ** 0.5))
    if hs * ws != corr.shape[1]:
        raise ValueError("soft_inlier_count expects a square source grid")
    maps = corr.reshape(B, hs, ws, ht * wt).permute(0, 3, 1, 2).reshape(B * ht * wt, 1, hs, ws)
    if radius > 0:
        k = 2 * radius + 1
        maps = F.avg_pool2d(maps, k, stride=1, padding=radius, count_include_pad=True) * (k * k)
    v = F.grid_sample(maps, src_pts.reshape(B * ht * wt, 1, 1, 2).to(maps.dtype), mode="bilinear",
                      padding_mode="zeros", align_corners=True)  # (B * ht * wt, 1, 1, 1)
    return v.reshape(B, ht * wt).mean(dim=1)


def match_share(model: SemanticModel, out: StageOutput) -> torch.Tensor:
    """``(B,)`` in [0, 1]: the share of the final correlation's match energy (``s^2``, which sums to 1
    over the source for each target cell) within the inlier radius of where the map sends each
    target cell; the pair method's confidence."""
    B, g = out.theta.shape[0], model.cfg.grid
    cells = feature_cell_points(g, g, B, like=out.theta)
    if out.tps_dst is None:
        return soft_inlier_count(out.corr_affine ** 2, SG.affine_points(out.theta, cells), model.cfg.inlier_radius).clamp(0, 1)
    to_src = SG.tps_points(model.ctrl(cells), out.tps_dst, cells)
    return soft_inlier_count(out.corr_tps ** 2, to_src, model.cfg.inlier_radius).clamp(0, 1)


def save_model(model: SemanticModel, model_dir: str | Path, extra: dict | None = None) -> None:
    """``config.json`` (the config, ``"method": "semantic"``, and ``extra``) and ``semantic.safetensors``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS_NAME))
    (model_dir / CONFIG_NAME).write_text(json.dumps({**model.cfg.to_dict(), **(extra or {})}, indent=1))


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> SemanticModel:
    """What :func:`save_model` wrote (JSON and safetensors only; nothing pickled)."""
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{model_dir}: not a semantic model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        d = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: unreadable ({e})") from None
    if d.get("method") != "semantic":
        raise ValueError(f"{model_dir}: a {d.get('method')!r} model, not a semantic one")
    model = SemanticModel(SemanticConfig.from_dict(d))
    model.load_state_dict(load_file(str(w_path)))
    return model.to(device).eval()
