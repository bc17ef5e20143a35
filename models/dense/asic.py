"""Dense alignment of a small collection onto a learned canonical grid, after ASIC (Gupta et al.,
ICCV 2023): method ``"dense"``.

A small conv net, trained from scratch on the one collection, maps each image to a
``canon_from_image`` coordinate map: every pixel's point on a shared canonical grid (normalised,
``align_corners=True``; see :mod:`models.dense.warps`). The map is an affine part (from a global
head) plus a smooth residual flow (a 16 x 16 field, upsampled bilinearly); both heads start at
zero, so a fresh net maps every image by the identity. A learned canonical *atlas* (RGB +
foreground logit, ``atlas_size`` square) is what the collection looks like on the grid.

Losses, per training step (docs/dense.md compares them with the paper's):

* **contrastive** on pseudo-correspondences (:mod:`models.dense.matching`): for a pair of images and
  ``M`` of their matches, the canonical points of the two sides form an ``M x M`` table of
  logits ``-|c_a(p_m) - c_b(q_n)|^2 / tau``; cross-entropy pulls each match together and pushes the
  other ``M - 1`` points of the pair away (both directions). As in ASIC, it also keeps the
  canonical grid from collapsing to a point.
* **equivariance**: a random smooth warp ``T`` (affine + thin-plate spline) of an image must move
  its map the same way, ``c_{I o T}(x) = c_I(T(x))``.
* **reconstruction**: the atlas, read at each image's map, must reproduce the image where the
  foreground estimate is on, and its alpha must reproduce the estimate (ASIC's mask loss).
* **smoothness**: squared first differences of the residual flow field.
* a **frame anchor** (ours): the mean affine part over the collection stays the identity, so the
  canonical frame is the collection's average frame (the losses above do not fix it) and the
  per-image homographies the pipeline writes frame the object as the images do.

Not implemented: ASIC's part-consistency (cluster) loss and its flip handling.

Device and dtype follow the images.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..imageio import InputError
from ..methods import FitContext, FitResult, Progress, register_aligner, register_method
from . import warps as W
from .features import FEATURES, FeatureConfig, make_extractor
from .matching import Matches, pseudo_correspondences

__all__ = ["DenseConfig", "AlignNet", "DenseAligner", "DenseMethod", "MAX_IMAGES", "fit_dense", "homographies",
           "DenseFit"]

# Above this many images the method refuses: its pseudo-correspondences are every pair's (N^2 / 2
# descriptor tables) and the per-collection net memorises each image; DPRC is the method for more.
MAX_IMAGES = 64


@dataclass(frozen=True)
class DenseConfig:
    steps: int = 600
    net_size: int = 32  # the net's input side (images are resized to it; maps come back at image size)
    width: int = 16
    flow_grid: int = 8
    atlas_size: int = 64
    lr: float = 2e-3
    atlas_lr: float = 3e-2
    pairs_per_step: int = 8
    matches_per_step: int = 32  # matches of a pair per step (the contrastive table is this square)
    tau: float = 0.01
    equi_images: int = 4
    equi_rotation_deg: float = 15.0
    equi_scale: float = 0.1
    equi_translation: float = 0.1
    equi_tps: float = 0.03
    w_contrast: float = 1.0
    w_equi: float = 4.0
    w_recon: float = 1.0
    w_mask: float = 0.1
    w_smooth: float = 1.0
    w_anchor: float = 10.0
    features: str = "randconv"  # measured best of the weight-free two on the synthetic sets (docs/dense.md)
    vit_path: str | None = None
    vit_heads: int | None = None
    per_pair: int = 64  # matches kept for a pair
    ratio: float = 0.9  # the matches' ratio test
    verify: float = 0.15  # affine RANSAC tolerance on each pair's matches (normalised units); 0: off
    seed: int = 0
    # Torch CPU threads while fitting on a CPU (restored after); None: leave as set. One thread ran a
    # step of these small convolutions 7x faster than two on a shared 2-core machine (docs/dense.md).
    cpu_threads: int | None = 1

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"unknown features {self.features!r}; choose one of {', '.join(FEATURES)}")
        if self.features == "vit" and not self.vit_path:
            raise ValueError("features 'vit' needs vit_path: a safetensors file of the ViT's weights")
        for k in ("steps", "net_size", "width", "flow_grid", "atlas_size", "pairs_per_step", "matches_per_step"):
            if getattr(self, k) < 1:
                raise ValueError(f"dense option {k} must be positive, got {getattr(self, k)}")

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(kind=self.features, vit_path=self.vit_path, vit_heads=self.vit_heads, seed=self.seed)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # No normalisation layer: GroupNorm tripled a CPU step, and a net fitted to one collection
    # from an identity start trains without it.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.1))


class AlignNet(nn.Module):
    """Images ``(B, 3, S, S)`` -> ``canon_from_image`` maps at ``S``, ``(B, S, S, 2)``, with the affine
    part ``(B, 2, 3)`` and the residual flow ``(B, 2, g, g)``. Identity at initialisation."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        w, s = cfg.width, cfg.net_size
        self.size = s
        self.grid = cfg.flow_grid
        self.enc1 = nn.Sequential(_conv(5, w, 2), _conv(w, w))  # S/2
        self.enc2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # S/4
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # S/8
        self.enc4 = nn.Sequential(_conv(4 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(4))  # (B, 4w, 4, 4)
        self.affine = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.LeakyReLU(0.1), nn.Linear(128, 6))
        self.flow = nn.Sequential(_conv(6 * w + 2, 2 * w), _conv(2 * w, 2 * w), nn.Conv2d(2 * w, 2, 3, 1, 1))
        for head in (self.affine[-1], self.flow[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, images: torch.Tensor):
        B = images.shape[0]
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        ident = W.identity_map(self.size, self.size, like=x)  # (1, S, S, 2)
        x = torch.cat([x - 0.5, ident.permute(0, 3, 1, 2).expand(B, -1, -1, -1)], 1)  # coordinates as input
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        theta = self.affine(e4)  # (B, 6): identity-centred
        A = theta.view(B, 2, 3) + torch.eye(2, 3, dtype=x.dtype, device=x.device)
        f = torch.cat([F.interpolate(e2, size=(self.grid, self.grid), mode="bilinear", align_corners=True),
                       F.interpolate(e3, size=(self.grid, self.grid), mode="bilinear", align_corners=True),
                       W.identity_map(self.grid, self.grid, like=x).permute(0, 3, 1, 2).expand(B, -1, -1, -1)], 1)
        flow = self.flow(f)  # (B, 2, g, g)
        up = F.interpolate(flow, size=(self.size, self.size), mode="bilinear", align_corners=True)
        cmap = W.affine_apply(A, ident.reshape(1, -1, 2).expand(B, -1, -1)).view(B, self.size, self.size, 2)
        return cmap + up.permute(0, 2, 3, 1), A, flow


def _random_warps(n: int, cfg: DenseConfig, like: torch.Tensor, gen: torch.Generator):
    """Small random ``(A, ctrl, params)`` warps for the equivariance loss (:func:`warps.warp_points`)."""
    def u(lim):
        return ((torch.rand(n, generator=gen) * 2 - 1) * lim).to(like)

    th = u(cfg.equi_rotation_deg * math.pi / 180)
    s = torch.exp(u(cfg.equi_scale))
    c, si = torch.cos(th) * s, torch.sin(th) * s
    A = torch.stack([torch.stack([c, -si, u(cfg.equi_translation)], -1),
                     torch.stack([si, c, u(cfg.equi_translation)], -1)], -2)
    g = torch.linspace(-1, 1, 3).to(like)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    ctrl = torch.stack([gx, gy], -1).reshape(1, 9, 2).expand(n, -1, -1).contiguous()
    target = ctrl + cfg.equi_tps * torch.randn(n, 9, 2, generator=gen).to(like)
    return A, ctrl, W.tps_fit(ctrl, target)


@dataclass
class DenseFit:
    """What :func:`fit_dense` learned."""

    net: AlignNet
    atlas: torch.Tensor  # (4, A, A): RGB in [0, 1] and the foreground logit
    flows: torch.Tensor  # (N, H, W, 2) canon_from_image at the images' size
    masks: torch.Tensor  # (N, H, W) foreground: the atlas alpha read at each map
    matches: Matches
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def _maps(net: AlignNet, images: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at the images' own size ``(N, H, W, 2)`` and affine parts ``(N, 2, 3)``, no grad."""
    H, Wd = images.shape[-2:]
    out, aff = [], []
    with torch.no_grad():
        for s in range(0, len(images), chunk):
            c, A, _ = net(images[s:s + chunk])
            if c.shape[1:3] != (H, Wd):
                c = F.interpolate(c.permute(0, 3, 1, 2), size=(H, Wd), mode="bilinear",
                                  align_corners=True).permute(0, 2, 3, 1)
            out.append(c)
            aff.append(A)
    return torch.cat(out), torch.cat(aff)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


def fit_dense(images: torch.Tensor, cfg: DenseConfig = DenseConfig(), *, progress=None, should_stop=None,
              matches: Matches | None = None) -> DenseFit:
    """Train the map net and the atlas on one collection (:func:`_fit_dense`), on a CPU with
    ``cfg.cpu_threads`` torch threads."""
    if images.device.type != "cpu" or cfg.cpu_threads is None:
        return _fit_dense(images, cfg, progress=progress, should_stop=should_stop, matches=matches)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)
    try:
        return _fit_dense(images, cfg, progress=progress, should_stop=should_stop, matches=matches)
    finally:
        torch.set_num_threads(before)


def _fit_dense(images: torch.Tensor, cfg: DenseConfig, *, progress=None, should_stop=None,
               matches: Matches | None = None) -> DenseFit:
    """Train the map net and the atlas on one collection.

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (``C`` 1 or 3), on the device to train on.
        matches: precomputed pseudo-correspondences (default: from ``cfg``'s features).
        progress: called with :class:`models.methods.Progress` now and then.
        should_stop: polled every step; true raises :class:`models.methods.Cancelled`.
    """
    from ..methods import Cancelled

    t0 = time.time()
    x = _rgb(images.float())
    N, _, H, Wd = x.shape
    dev = x.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    timings = {}
    if matches is None:
        with torch.no_grad():
            feats = make_extractor(cfg.feature_config()).to(dev)(x)
        timings["features"] = round(time.time() - t0, 3)
        matches = pseudo_correspondences(feats, per_pair=cfg.per_pair, ratio=cfg.ratio, verify=cfg.verify)
        timings["matching"] = round(time.time() - t0 - timings["features"], 3)
    usable = (matches.weight.sum(1) > 0).nonzero().squeeze(1)
    if usable.numel() == 0:
        raise InputError("dense alignment found no pseudo-correspondence between any two images: "
                         "the images share no recognisable content under these features")
    net = AlignNet(cfg).to(dev)
    atlas = torch.zeros(4, cfg.atlas_size, cfg.atlas_size, device=dev)
    atlas[:3] = x.mean((0, 2, 3)).view(3, 1, 1)
    atlas.requires_grad_(True)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": cfg.lr},
                            {"params": [atlas], "lr": cfg.atlas_lr}])
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.5 + 0.5 * math.cos(math.pi * min(1.0, i / max(1, cfg.steps)))))  # warm-up, then cosine
    S = cfg.net_size
    xs = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
    fg = F.interpolate(matches.foreground.unsqueeze(1), size=(S, S), mode="bilinear", align_corners=True)[:, 0]
    fg = fg.to(dev)
    M = cfg.matches_per_step
    eye = torch.arange(M, device=dev)
    history = []
    t_train = time.time()
    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        # A step sees the images of a few pairs (SGD over the collection: a CPU step stays cheap).
        pick = usable[torch.randint(usable.numel(), (min(cfg.pairs_per_step, usable.numel()),), generator=gen)]
        batch, inv = torch.unique(matches.pairs[pick].reshape(-1), return_inverse=True)
        ab = inv.view(-1, 2).to(dev)  # the pairs' positions in the batch
        batch = batch.to(dev)
        cmap, A, flow = net(xs[batch])  # (B, S, S, 2)
        cfield = cmap.permute(0, 3, 1, 2)  # (B, 2, S, S)
        # Contrastive on the pairs' matches.
        wts = matches.weight[pick]  # (P, Mp)
        idx = torch.multinomial(wts.cpu() + 1e-12, M, replacement=True, generator=gen).to(dev)  # gen: a CPU generator
        pa = torch.gather(matches.pts_a[pick].to(dev), 1, idx.unsqueeze(-1).expand(-1, -1, 2))
        pb = torch.gather(matches.pts_b[pick].to(dev), 1, idx.unsqueeze(-1).expand(-1, -1, 2))
        ca = W.sample_points(cfield[ab[:, 0]], pa)  # (P, M, 2)
        cb = W.sample_points(cfield[ab[:, 1]], pb)
        logits = -torch.cdist(ca, cb).pow(2) / cfg.tau  # (P, M, M)
        # Repeated draws of one match are the same positive: mask the copies out of the negatives.
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        logits = logits.masked_fill(same & ~torch.eye(M, dtype=torch.bool, device=dev), float("-inf"))
        l_con = 0.5 * (F.cross_entropy(logits.reshape(-1, M), eye.repeat(len(pick)))
                       + F.cross_entropy(logits.transpose(1, 2).reshape(-1, M), eye.repeat(len(pick))))
        # Equivariance under a small random warp, on some of the batch.
        e = torch.randperm(len(batch), generator=gen)[:cfg.equi_images].to(dev)
        Ae, ce, pe = _random_warps(len(e), cfg, xs, gen)
        tmap = W.warp_map(Ae, ce, pe, S, S)  # (E, S, S, 2): warped pixel -> original pixel
        xw = W.sample_map(xs[batch[e]], tmap, padding_mode="reflection")
        cw, _, _ = net(xw)
        target = W.sample_map(cfield[e], tmap, padding_mode="border").permute(0, 2, 3, 1)
        inside = (tmap.abs() <= 1).all(-1).to(x.dtype)  # (E, S, S)
        l_equi = ((cw - target).norm(dim=-1) * inside).sum() / inside.sum().clamp_min(1)
        # Reconstruction of the foreground from the atlas, and of the foreground estimate from its alpha.
        rec = W.sample_map(atlas.unsqueeze(0).expand(len(batch), -1, -1, -1), cmap, padding_mode="border")
        fb = fg[batch]
        l_rec = ((rec[:, :3] - xs[batch]).abs().mean(1) * fb).sum() / fb.sum().clamp_min(1e-6)
        l_mask = F.binary_cross_entropy_with_logits(rec[:, 3], fb)
        l_smooth = ((flow[..., 1:, :] - flow[..., :-1, :]).pow(2).mean() + (flow[..., 1:] - flow[..., :-1]).pow(2).mean()) \
            * cfg.flow_grid ** 2
        l_anchor = (A - torch.eye(2, 3, dtype=A.dtype, device=dev)).mean(0).pow(2).sum()
        loss = (cfg.w_contrast * l_con + cfg.w_equi * l_equi + cfg.w_recon * l_rec + cfg.w_mask * l_mask
                + cfg.w_smooth * l_smooth + cfg.w_anchor * l_anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            atlas[:3].clamp_(0, 1)
        if step % 50 == 0 or step == cfg.steps - 1:
            parts = {"loss": loss, "contrast": l_con, "equi": l_equi, "recon": l_rec, "smooth": l_smooth,
                     "anchor": l_anchor}
            rec_ = {"step": step, **{k: round(v.detach().item(), 6) for k, v in parts.items()}}
            history.append(rec_)
            if progress is not None:
                el = time.time() - t_train
                progress(Progress("training", step=step + 1, total=cfg.steps, loss=rec_["loss"],
                                  eta_s=el / (step + 1) * (cfg.steps - step - 1)))
    timings["training"] = round(time.time() - t_train, 3)
    net.eval()
    flows, _ = _maps(net, x)
    atlas = atlas.detach()
    masks = _alpha(atlas, flows)
    return DenseFit(net, atlas, flows, masks, matches, history, timings)


def _alpha(atlas: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """The atlas's foreground read at each map: ``(N, H, W)``."""
    a = W.sample_map(atlas[3:4].unsqueeze(0).expand(len(flows), -1, -1, -1), flows, padding_mode="border")
    return torch.sigmoid(a[:, 0])


def homographies(flows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's best homography ``in_from_out_norm`` (canonical grid = the aligned output frame,
    normalised) in the weighted least-squares sense over its pixels (DLT on normalised points).

    Args:
        flows: ``(N, H, W, 2)`` canon_from_image maps.
        weights: ``(N, H, W)`` per-pixel weights (e.g. the foreground); default 1.
    Returns:
        ``(N, 3, 3)`` float32 on the flows' device, ``[2, 2] = 1``.
    """
    N, H, Wd, _ = flows.shape
    img = W.identity_map(H, Wd, like=flows.double()).reshape(1, -1, 2).expand(N, -1, -1)  # input points
    can = flows.double().reshape(N, -1, 2)  # output points
    w = torch.ones(N, H * Wd, dtype=torch.float64, device=flows.device) if weights is None \
        else weights.double().reshape(N, -1) + 1e-3
    x, y = can[..., 0], can[..., 1]
    u, v = img[..., 0], img[..., 1]
    z, o = torch.zeros_like(x), torch.ones_like(x)
    ru = torch.stack([x, y, o, z, z, z, -u * x, -u * y, -u], -1)
    rv = torch.stack([z, z, z, x, y, o, -v * x, -v * y, -v], -1)
    Amat = torch.cat([ru, rv], 1) * torch.cat([w, w], 1).sqrt().unsqueeze(-1)  # (N, 2HW, 9)
    _, _, Vh = torch.linalg.svd(Amat.transpose(1, 2) @ Amat)
    Hm = Vh[:, -1].view(N, 3, 3)
    Hm = Hm / Hm[:, 2:3, 2:3]
    return Hm.float()


class DenseAligner:
    """A trained dense aligner: new images -> maps (and the homographies the pipeline needs)."""

    method = "dense"
    reproduces_fit = True  # the fit's homographies are exactly what align() gives on the same images

    def __init__(self, cfg: DenseConfig, net: AlignNet, atlas: torch.Tensor, fit: DenseFit | None = None,
                 images: torch.Tensor | None = None):
        self.cfg, self.net, self.atlas, self.fit, self.images = cfg, net.eval(), atlas, fit, images

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> canon_from_image maps ``(B, H, W, 2)`` and foreground ``(B, H, W)``."""
        flows, _ = _maps(self.net, _rgb(images.float()))
        return flows, _alpha(self.atlas.to(flows), flows)

    def align(self, images: torch.Tensor) -> torch.Tensor:
        flows, masks = self.maps(images)
        return homographies(flows, masks)

    def save(self, model_dir: Path) -> None:
        from safetensors.torch import save_file

        from .outputs import write_outputs

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps({"method": self.method, "config": asdict(self.cfg)},
                                                          indent=1))
        state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        state["atlas"] = self.atlas.detach().cpu().contiguous()
        save_file(state, str(model_dir / "dense.safetensors"))
        if self.fit is not None and self.images is not None:
            write_outputs(model_dir, self.images, self.fit.flows, self.fit.masks, self.atlas)


@register_aligner("dense")
def load_dense(model_dir: Path, device: torch.device) -> DenseAligner:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())["config"]
    known = {f.name for f in fields(DenseConfig)}
    cfg = DenseConfig(**{k: v for k, v in raw.items() if k in known})
    state = load_file(str(model_dir / "dense.safetensors"), device="cpu")
    net = AlignNet(cfg)
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return DenseAligner(cfg, net.to(device), state["atlas"].to(device))


@register_method("dense")
class DenseMethod:
    """The collection method ``"dense"``: options are :class:`DenseConfig`'s fields; ``budget`` is
    the number of training steps."""

    name = "dense"

    def __init__(self, **overrides):
        known = {f.name for f in fields(DenseConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown dense option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        self.cfg = DenseConfig(**overrides)

    @staticmethod
    def check_size(n: int) -> None:
        """``InputError`` for a collection this method does not take (the pipeline asks before reading it)."""
        if n > MAX_IMAGES:
            raise InputError(f"method dense aligns small collections (at most {MAX_IMAGES} images; this one has {n}): "
                             f"it matches every pair of images and fits one network to each image, so its cost grows "
                             f"with the square of the collection; use method dprc for large collections")
        if n < 2:
            raise InputError("method dense needs at least 2 images")

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        N = images.shape[0]
        if ctx.world > 1:
            raise InputError("method dense trains on one device: run it with gpus=1")
        self.check_size(N)
        cfg = self.cfg if ctx.budget is None else replace(self.cfg, steps=int(ctx.budget))
        if ctx.seed != cfg.seed:
            cfg = replace(cfg, seed=ctx.seed)
        ctx.report(Progress("training", message="pseudo-correspondences"))
        fit = fit_dense(images, cfg, progress=ctx.progress, should_stop=ctx.should_stop)
        H = homographies(fit.flows, fit.masks).cpu()
        notes = [f"dense: {fit.matches.count} pseudo-correspondences over {int(fit.matches.pairs.shape[0])} pairs "
                 f"({cfg.features} features); maps, atlas and point transfer under model/"]
        u8 = (_rgb(images.float()).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        aligner = DenseAligner(cfg, fit.net, fit.atlas, fit, u8)
        return FitResult(in_from_out_norm=H, aligner=aligner, history=fit.history, notes=notes,
                         timings=fit.timings)
