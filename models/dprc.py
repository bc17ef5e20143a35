"""Deep Penalised Reconstruction Congealing (Annunziata, Sagonas, Cali; ICCV 2019).

Objective (Eq. 8), minimised end to end with Adam over mini-batches::

    D = | warp(I_i; p_i) - I_ref |_1                                  (Eq. 5)
    C = | AE(warp(I_i; p_i)) - warp(I_i; p_i) |_1 + gamma w^T z_i     (Eq. 7)
    L = D + lambda C

with ``p_i = DeSTNet(I_i)`` and ``w_l = l^k / sum l^k``. We average instead of
summing (a constant scale absorbed by the learning rate).

What we add for robustness (each switchable in :class:`DPRCConfig`, each
measured against ground truth in ``docs/benchmarks.md``):

* ``init="moments"``: before the DeSTNet, every image is brought onto the
  reference's frame by translation + isotropic scale from its intensity
  moments (centroid and RMS radius of the foreground). Deterministic and
  content-based, so both copies of one source start at the same place.
* ``bound``: the DeSTNet's fused correction is soft-bounded (homographies are
  predicted as corner offsets, see :func:`models.geometry.offsets_to_homography`).
  Without it the objective zooms out or slides the object out of the frame.
* ``equivariance``: a self-supervised consistency loss. Each batch is also
  re-warped by random known homographies ``P``; the aligner must satisfy
  ``P M(x') = M(x)``. The image distance is nearly flat in the directions
  that make two views of one object disagree; this loss fixes them.
* ``c_grad_from``: C trains the auto-encoder from the start but reaches the
  aligner only later (an untrained auto-encoder rewards empty images).
* ``distance``: D in the output frame (Eq. 5, default), the input frame or both.
  Each frame has its own degenerate optimum (zooming out, zooming in); see
  ``docs/benchmarks.md``, round 5, for why the default stays Eq. 5.
* ``passes``: the DeSTNet is applied this many times in a row with the same
  weights, each pass starting from the previous pass's warp, in training and at
  inference. A one-pass aligner under-corrects; a network trained to be
  iterated corrects most of what is left (round 6 in the benchmarks).
* ``reframe``: a fit whose aligned frames keep a median of less than
  ``metrics.CONTENT_KEPT_MIN`` of each image's content (a zoom into the object,
  checked without ground truth) is fitted again with the moment regulariser at
  this weight, and the fit that keeps more content is returned.
* ``width``: Table 1's MNIST DeSTNet has 4 and 8 conv channels; the default
  multiplies them (and the regressor) by 4, trained on batches of 256, which
  lowered the residual on every digit (round 7 in the benchmarks). The LFW
  aligner (64-256 channels) keeps its width.
* ``equivariance_frame``: the equivariance views can also be made from each
  image's current aligned frame; measured worse, off by default.
* ``equivariance_units``: the equivariance distance in units of each aligned
  frame's size instead of the input's. In input units the loss itself rewards
  zooming into the object (every distance shrinks), which is why strong
  equivariance weights crop; in frame units it does not, but the fit then
  drifts larger at sigma >= 20 % (round 9 in the benchmarks); off by default.
* A coarse-to-fine distance (blur annealed from ``blur_start`` to 0), a warp
  curriculum (``curriculum``), background-aware padding (``padding``),
  cosine learning-rate decay.

Reference rule (``reference_index=None``): the image whose blurred version is
closest (L1) to the blurred mean of the collection: a typical, central member.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import geometry as G
from . import metrics as M
from .methods import FitContext, FitResult, Progress, register_aligner, register_method
from .imageops import background, blur
from .nets import PRESETS, AutoEncoderConfig, DeSTNet, DeSTNetConfig, PenalisedAutoEncoder

DEFAULT_WIDTH = {"mnist": 4.0, "small": 4.0, "lfw": 1.0}

__all__ = ["DEFAULT_WIDTH", "DPRCConfig", "DPRC", "DPRCAligner", "choose_reference", "moment_init", "blur",
           "curriculum_family", "guarded_step", "MAX_BAD_STEPS"]


@dataclass(frozen=True)
class DPRCConfig:
    preset: str = "auto"  # "mnist" | "lfw" | "small" | "auto" (mnist up to 48 px a side, else lfw)
    lam: float = 1.0  # lambda, weight of the complexity term C
    gamma: float = 1.0  # weight of the positional code penalty
    k: int = 1  # exponent of the positional weights
    code: int = 64  # |z|
    lr: float = 1e-3
    lr_final: float = 0.02  # cosine decay to lr * lr_final
    batch_size: int = 256  # Table 1 does not say; 256 measured better than 64 (round 7 in the benchmarks)
    epochs: int | None = None  # None: enough epochs for ~steps_target steps (10..300)
    steps_target: int = 1500
    init: str = "moments"  # "moments" (centroid + scale) | "centroid" | "identity"
    blur_start: float = 0.06  # Gaussian sigma as a fraction of the shorter side
    blur_until: float = 0.7  # fraction of training at which blur reaches 0
    curriculum: tuple[float, float, float, float] = (0.0, 0.1, 0.25, 0.4)
    padding: str = "border"  # "border" (background-aware) | "zeros"
    bound: float = 0.6  # soft bound on the DeSTNet's fused correction (normalised units); 0: none
    moment_weight: float = 0.0  # weight of the moment-matching regulariser; 0: none (see docs)
    c_grad_from: float = 0.3  # fraction of training after which C's gradient reaches the aligner
    equivariance: float = 1.0  # weight of the self-supervised equivariance loss; 0: off
    equivariance_sigma: float = 0.08  # size of its random homographies (the perturbation protocol's sigma)
    # Where the equivariance loss's views are made: "input" (each image re-warped), "aligned"
    # (each image seen from its current aligned frame, then re-warped), or "both".
    equivariance_frame: str = "input"
    # Units of the equivariance distance: "input" (normalised input coordinates) or "frame" (each
    # image's distance divided by the linear size of its aligned frame in the input). In input units
    # zooming into the object shrinks every corner distance, so the loss itself rewards cropping.
    equivariance_units: str = "input"
    aligned_sigma: float = 0.15  # "aligned" views: per-image size drawn uniformly from [0, aligned_sigma]
    # "as_is" | "centred": the reference's object moved to the frame centre | "normalised": centred
    # and scaled to the collection's median object size (a strongly perturbed reference can be
    # far larger or smaller than the typical object; every image would be scaled after it)
    reference_frame: str = "as_is"
    max_scale: float = 2.5  # clamp of the moment initialisation's scale (and of its inverse)
    distance: str = "output"  # D compared in the "output" (reference) frame, the "input" frame, or "symmetric"
    passes: int = 2  # the DeSTNet applied this many times in a row, same weights (trained and at inference)
    stages: int = 0  # DeSTNet stages; 0: the preset's
    # Multiplies the DeSTNet's conv channels and regressor width (1: Table 1's); None: the
    # preset's DEFAULT_WIDTH (4 for the 4-and-8-channel MNIST aligners, measured in round 7;
    # 1 for LFW's, which has 64-256 channels already and was not measured wider).
    width: float | None = None
    # When the fit crops (median content kept < metrics.CONTENT_KEPT_MIN), fit again with this
    # moment_weight and keep the fit that keeps more content; 0: never. See docs/benchmarks.md.
    reframe: float = 1.0
    checkpoint_every_s: float = 20.0

    def resolve_epochs(self, n: int) -> int:
        if self.epochs is not None:
            return max(1, int(self.epochs))
        steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        return int(min(300, max(10, math.ceil(self.steps_target / steps_per_epoch))))


# --------------------------------------------------------------------------- helpers

# A step whose loss or gradient is not finite is skipped (a homography composed over two passes
# and the equivariance view can send an image's frame through the line at infinity); this many in
# a row means the parameters themselves are broken, and the fit stops.
MAX_BAD_STEPS = 20


def _finite(v: float, digits: int = 6) -> float | None:
    return round(v, digits) if math.isfinite(v) else None


def guarded_step(loss: torch.Tensor, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> tuple[bool, float]:
    """Back-propagate ``loss`` and step ``opt`` only if the loss and the gradient are finite.

    Returns ``(taken, loss value)``; a skipped step leaves the parameters and the optimiser's
    moments untouched. One device sync, which also reads the loss for progress reports.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    value, norm = torch.stack([loss.detach().float(), norm.float()]).tolist()
    if math.isfinite(value) and math.isfinite(norm):
        opt.step()
        return True, value
    opt.zero_grad(set_to_none=True)
    return False, value


def _warp_bg(x: torch.Tensor, M_: torch.Tensor, bg: torch.Tensor | None) -> torch.Tensor:
    """Same-size warp; outside the input: ``bg`` ``(B, C, 1, 1)``, or 0 when None."""
    return G.warp(x, M_, tuple(x.shape[-2:]), fill=bg)


def _moments(x: torch.Tensor, bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground centroid ``(B, 2)`` and RMS radius ``(B,)`` in normalised coords, and mass ``(B,)``.

    Foreground is the absolute deviation from the background, so dark-on-light
    collections work as well as light-on-dark ones.
    """
    H, W = x.shape[-2:]
    f = (x - bg).abs().mean(1)  # (B, H, W)
    mass = f.sum(dim=(1, 2))
    ys = torch.linspace(-1, 1, H, dtype=x.dtype, device=x.device) if H > 1 else x.new_zeros(1)
    xs = torch.linspace(-1, 1, W, dtype=x.dtype, device=x.device) if W > 1 else x.new_zeros(1)
    wgt = f / mass.clamp_min(1e-8)[:, None, None]
    cx = (wgt.sum(1) * xs).sum(-1)
    cy = (wgt.sum(2) * ys).sum(-1)
    var = (wgt * ((xs[None, None, :] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2)).sum(dim=(1, 2))
    return torch.stack([cx, cy], 1), var.clamp_min(1e-8).sqrt(), mass


def moment_init(x: torch.Tensor, ref_centroid: torch.Tensor, ref_radius: torch.Tensor,
                max_scale: float = 2.5, scale: bool = True) -> torch.Tensor:
    """Translation + isotropic scale mapping each image's foreground moments onto the reference's.

    Returns ``(B, 3, 3)`` ``in_from_out_norm``: ``p_in = c_i + s_i (p_out - c_ref)``,
    ``s_i = r_i / r_ref``. Images with no foreground get the identity.
    """
    bg = background(x)
    c, r, mass = _moments(x, bg)
    s = (r / ref_radius).clamp(1 / max_scale, max_scale) if scale else torch.ones_like(r)
    empty = mass <= 1e-6 * x.shape[-1] * x.shape[-2]
    s = torch.where(empty, torch.ones_like(s), s)
    t = c - s[:, None] * ref_centroid[None, :]
    t = torch.where(empty[:, None], torch.zeros_like(t), t)
    B = x.shape[0]
    out = torch.zeros(B, 3, 3, dtype=x.dtype, device=x.device)
    out[:, 0, 0] = s
    out[:, 1, 1] = s
    out[:, :2, 2] = t
    out[:, 2, 2] = 1
    return out


def moment_penalty(aligned: torch.Tensor, bg: torch.Tensor, ref_c: torch.Tensor,
                   ref_r: torch.Tensor) -> torch.Tensor:
    """Mean of ``|c - c_ref|_1 + |log(r / r_ref)|`` over the batch (foreground moments).

    Differentiable through the warp: it keeps each aligned object where the
    reference's is and as large, which removes the degenerate optima of ``D``
    and ``C`` (shrinking, zooming out, sliding out of the frame).
    """
    c, r, _ = _moments(aligned, bg)
    return ((c - ref_c).abs().sum(1) + (r / ref_r).log().abs()).mean()


def _median_radius(x: torch.Tensor, bg: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Median foreground RMS radius of a collection ``(N, C, H, W)``, normalised units, 0-d."""
    r = torch.cat([_moments(x[k:k + chunk], bg[k:k + chunk])[1] for k in range(0, x.shape[0], chunk)])
    return r.median()


def choose_reference(x: torch.Tensor, chunk: int = 1024) -> int:
    """Index of the image whose blurred version is L1-closest to the blurred mean."""
    sigma = 0.06 * min(x.shape[-2:])
    mean = torch.zeros_like(x[:1])
    for k in range(0, x.shape[0], chunk):
        mean += blur(x[k:k + chunk], sigma).sum(0, keepdim=True)
    mean /= x.shape[0]
    d = torch.cat([(blur(x[k:k + chunk], sigma) - mean).abs().mean(dim=(1, 2, 3))
                   for k in range(0, x.shape[0], chunk)])
    return int(d.argmin())


def curriculum_family(family: str, frac: float, schedule) -> str | None:
    """The family training is limited to at progress ``frac`` in [0, 1], or None for no limit.

    ``schedule[r]`` is the fraction of training at which the family of rank
    ``r`` (translation, similarity, affine, homography) unlocks.
    """
    names = ["translation", "similarity", "affine", "homography"]
    unlocked = max(i for i, t in enumerate(schedule) if frac >= t)
    target = G.get_family(family)
    return None if unlocked >= target.rank else names[unlocked]


# --------------------------------------------------------------------------- aligner


class DPRCAligner:
    """A trained DPRC aligner: moment initialisation + DeSTNet, one forward pass."""

    method = "dprc"

    def __init__(self, net: DeSTNet, init: str, ref_centroid: torch.Tensor, ref_radius: torch.Tensor,
                 padding: str = "border", max_scale: float = 2.5, passes: int = 1):
        self.net = net.eval()
        self.init = init
        self.ref_centroid = ref_centroid
        self.ref_radius = ref_radius
        self.padding = padding
        self.max_scale = max_scale
        self.passes = passes

    def base(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.init not in ("moments", "centroid"):
            return None
        return moment_init(x, self.ref_centroid.to(x), self.ref_radius.to(x), max_scale=self.max_scale,
                           scale=self.init == "moments")

    def warps(self, x: torch.Tensor, limit: str | None = None, passes: int | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 3, 3)`` ``in_from_out_norm``, differentiable.

        Each pass after the first starts the DeSTNet from the previous pass's
        warp (the original image is still resampled once per stage), so a
        network that corrects a fraction of the misalignment per pass is
        iterated towards its fixed point.
        """
        xin = x - background(x) if self.padding == "border" else x
        M_ = self.base(x)
        for _ in range(self.passes if passes is None else passes):
            M_ = self.net(xin, M_, limit)
        return M_

    @torch.no_grad()
    def align(self, images: torch.Tensor) -> torch.Tensor:
        return self.warps(images.float())

    def save(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        cfg = {"method": "dprc", "init": self.init, "padding": self.padding, "max_scale": self.max_scale,
               "passes": self.passes, "destnet": asdict(self.net.cfg)}
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=1))
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["ref_centroid"] = self.ref_centroid.detach().cpu().float()
        tensors["ref_radius"] = self.ref_radius.detach().cpu().float().reshape(1)
        save_file(tensors, str(model_dir / "aligner.safetensors"))


@register_aligner("dprc")
def _load_dprc(model_dir: Path, device: torch.device) -> DPRCAligner:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d = cfg["destnet"]
    d["image_size"] = tuple(d["image_size"])
    d["convs"] = tuple(tuple(c) for c in d["convs"])
    net = DeSTNet(DeSTNetConfig(**d))
    t = load_file(str(Path(model_dir) / "aligner.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
    return DPRCAligner(net.to(device), cfg["init"], t["ref_centroid"].to(device),
                       t["ref_radius"].to(device)[0], cfg.get("padding", "border"), cfg.get("max_scale", 2.5),
                       int(cfg.get("passes", 1)))


# --------------------------------------------------------------------------- method


@register_method("dprc")
class DPRC:
    """The DPRC alignment method; ``DPRC(**overrides).fit(images, ctx)``."""

    name = "dprc"

    def __init__(self, **overrides):
        fields = DPRCConfig.__dataclass_fields__
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ValueError(f"unknown dprc option(s): {', '.join(sorted(unknown))}")
        if "curriculum" in overrides:
            overrides["curriculum"] = tuple(overrides["curriculum"])
        self.cfg = replace(DPRCConfig(), **overrides)
        if int(self.cfg.passes) < 1 or int(self.cfg.stages) < 0 or (self.cfg.width is not None
                                                                      and not self.cfg.width > 0):
            raise ValueError(f"dprc options passes={self.cfg.passes} (>= 1), stages={self.cfg.stages} (>= 0, 0: preset) "
                             f"and width={self.cfg.width} (> 0)")
        for name, allowed in (("init", ("moments", "centroid", "identity")), ("padding", ("border", "zeros")),
                              ("reference_frame", ("as_is", "centred", "normalised")),
                              ("distance", ("output", "input", "symmetric")),
                              ("equivariance_frame", ("input", "aligned", "both")),
                              ("equivariance_units", ("input", "frame")),
                              ("preset", ("auto", *PRESETS))):
            if getattr(self.cfg, name) not in allowed:
                raise ValueError(f"dprc option {name}={getattr(self.cfg, name)!r}; choose one of {', '.join(allowed)}")

    def _nets(self, C: int, size: tuple[int, int], warp: str) -> tuple[DeSTNet, PenalisedAutoEncoder]:
        preset = self.cfg.preset
        if preset == "auto":
            preset = "mnist" if max(size) <= 48 else "lfw"
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or auto")
        p = PRESETS[preset]
        d = dict(p["destnet"])
        if self.cfg.stages:
            d["stages"] = int(self.cfg.stages)
        width = self.cfg.width if self.cfg.width is not None else DEFAULT_WIDTH[preset]
        if width != 1:
            d["convs"] = tuple((k, max(1, round(ch * width)), s) for k, ch, s in d["convs"])
            d["hidden"] = round(d["hidden"] * width)
        dcfg = DeSTNetConfig(in_channels=C, image_size=size, warp=warp, bound=self.cfg.bound, **d)
        acfg = AutoEncoderConfig(in_channels=C, image_size=size, code=self.cfg.code, k=self.cfg.k, **p["ae"])
        return DeSTNet(dcfg), PenalisedAutoEncoder(acfg)

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        x = images.float()
        res = self._fit(x, ctx, self.cfg, ctx.checkpoint_dir)
        if self.cfg.reframe <= 0 or self.cfg.moment_weight > 0:
            return res
        kept = self._median_kept(x, res.in_from_out_norm)
        if kept >= M.CONTENT_KEPT_MIN:
            return res
        # The output-frame distance lets the aligner zoom into part of the object
        # (thin digits, objects half out of the frame). The moment regulariser keeps
        # the whole object but costs consistency where nothing was cropped, so it is
        # only paid for where the first fit cropped.
        ctx.report(Progress("training", message=f"the alignment keeps a median {kept:.2f} of each image's "
                            f"content; fitting again with moment_weight={self.cfg.reframe}"))
        ck = None if ctx.checkpoint_dir is None else Path(ctx.checkpoint_dir) / "reframe"
        try:
            res2 = self._fit(x, ctx, replace(self.cfg, moment_weight=self.cfg.reframe), ck)
        except FloatingPointError as e:
            # The re-fit is a second opinion; its failure must not lose the first fit.
            res.notes.append(f"the first fit kept a median {kept:.2f} of each image's content; a re-fit with "
                             f"moment_weight={self.cfg.reframe} failed ({e}); using the first fit")
            return res
        kept2 = self._median_kept(x, res2.in_from_out_norm)
        note = (f"the first fit kept a median {kept:.2f} of each image's content; a re-fit with "
                f"moment_weight={self.cfg.reframe} kept {kept2:.2f}")
        best = res2 if kept2 > kept else res
        best.notes.append(note + ("; using the re-fit" if best is res2 else "; using the first fit"))
        return best

    @staticmethod
    def _median_kept(x: torch.Tensor, in_from_out_norm: torch.Tensor) -> float:
        size = tuple(x.shape[-2:])
        pix = G.pixel_from_normalised(in_from_out_norm.double().to(x.device), size, size)
        kept, _ = M.framing(x.double(), pix, size, background(x).double())
        return float(kept.median())

    def _fit(self, x: torch.Tensor, ctx: FitContext, cfg: DPRCConfig, checkpoint_dir: Path | None) -> FitResult:
        dev = x.device
        N, C, H, W = x.shape
        G.get_family(ctx.warp)
        torch.manual_seed(ctx.seed)
        net, ae = self._nets(C, (H, W), ctx.warp)
        net, ae = net.to(dev), ae.to(dev)
        params = list(net.parameters()) + list(ae.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        epochs = cfg.resolve_epochs(N) if ctx.budget is None else max(1, int(ctx.budget))
        steps_per_epoch = max(1, math.ceil(N / cfg.batch_size))
        total = epochs * steps_per_epoch

        ref = choose_reference(x) if ctx.reference_index is None else int(ctx.reference_index)
        bg_all = background(x)  # (N, C, 1, 1)
        ref_img = x[ref:ref + 1]
        ref_c, ref_r, _ = _moments(ref_img, bg_all[ref:ref + 1])
        ref_c, ref_r = ref_c[0], ref_r[0]
        if cfg.reference_frame in ("centred", "normalised"):
            # A strongly perturbed reference can sit half out of the frame, or be far larger
            # or smaller than the typical object; every image is pulled after it. Centring
            # (and scaling to the median size) costs nothing when the reference is typical.
            scale = 1.0
            if cfg.reference_frame == "normalised":
                scale = min(max(float(ref_r / _median_radius(x, bg_all)), 1 / cfg.max_scale), cfg.max_scale)
            T = torch.eye(3, dtype=x.dtype, device=dev)[None].clone()
            T[0, 0, 0] = T[0, 1, 1] = scale
            T[0, :2, 2] = ref_c
            ref_img = _warp_bg(ref_img, T, bg_all[ref:ref + 1])
            ref_c, ref_r = torch.zeros_like(ref_c), ref_r / scale
        aligner = DPRCAligner(net, cfg.init, ref_c, ref_r, cfg.padding, cfg.max_scale, cfg.passes)

        notes: list[str] = []
        history: list[dict] = []
        start_epoch = 0
        fingerprint = {"n": N, "shape": [C, H, W], "warp": ctx.warp, "seed": ctx.seed,
                       "reference": ref, "config": json.loads(json.dumps(asdict(cfg))), "epochs": epochs}
        if checkpoint_dir is not None:
            start_epoch, history = self._resume(checkpoint_dir, fingerprint, net, ae, opt, params, notes)
            if start_epoch:
                ctx.report(Progress("training", step=start_epoch * steps_per_epoch, total=total,
                                    epoch=start_epoch, message=f"resumed from checkpoint at epoch {start_epoch}"))

        skipped = bad_run = 0
        sched_lr = lambda s: cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * s / max(1, total))))  # noqa: E731
        t0, last_ckpt = time.time(), time.time()
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, epochs):
            net.train()
            ae.train()
            g = torch.Generator().manual_seed(ctx.seed * 100_003 + epoch)
            perm = torch.randperm(N, generator=g).to(dev)
            for b in range(steps_per_epoch):
                ctx.check_stop()
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                frac = step / max(1, total)
                for grp in opt.param_groups:
                    grp["lr"] = sched_lr(step)
                xb, bgb = x[idx], bg_all[idx]
                limit = curriculum_family(ctx.warp, frac, cfg.curriculum)
                Mb = aligner.warps(xb, limit)
                aligned = _warp_bg(xb, Mb, bgb if cfg.padding == "border" else None)
                E = torch.zeros((), device=dev)
                if cfg.equivariance > 0:
                    E = self._equivariance(cfg, aligner, xb, bgb, Mb, limit, ctx.seed * 7919 + step)
                sigma = cfg.blur_start * min(H, W) * max(0.0, 1 - frac / max(cfg.blur_until, 1e-6))
                D = self._distance(cfg, xb, bgb, aligned, Mb, ref_img, bg_all[ref:ref + 1], sigma)
                if cfg.moment_weight > 0:
                    D = D + cfg.moment_weight * moment_penalty(aligned, bgb, ref_c, ref_r)
                if cfg.lam > 0:
                    # Early on the auto-encoder reconstructs nothing well, and an empty
                    # image is the cheapest to reconstruct: C alone would shrink the
                    # images. So C trains the AE from the start but reaches the aligner
                    # only once the alignment has taken shape.
                    recon, z = ae(aligned if frac >= cfg.c_grad_from else aligned.detach())
                    target = aligned if frac >= cfg.c_grad_from else aligned.detach()
                    Cterm = (recon - target).abs().mean() + cfg.gamma * ae.penalty(z).mean()
                else:  # D only (the paper's ablation): skip the auto-encoder's cost
                    Cterm = torch.zeros((), device=dev)
                loss = D + cfg.lam * Cterm + cfg.equivariance * E
                step += 1
                taken, value = guarded_step(loss, params, opt)
                if taken:
                    bad_run = 0
                else:
                    skipped, bad_run = skipped + 1, bad_run + 1
                    if bad_run >= MAX_BAD_STEPS:
                        raise FloatingPointError(f"training diverged: {bad_run} steps in a row up to step {step} "
                                                 f"had a non-finite loss or gradient (loss {value})")
                elapsed = time.time() - t0
                done = step - start_epoch * steps_per_epoch
                ctx.report(Progress("training", step=step, total=total, epoch=epoch + 1, loss=value if taken else None,
                                    apsnr=M.apsnr(aligned.detach()) if taken and len(idx) > 1 else None,
                                    eta_s=elapsed / done * (total - step) if done else None))
            # The epoch's last batch; a skipped one's non-finite values are recorded as null (JSON has no inf).
            history.append({"epoch": epoch + 1, "loss": _finite(value), "D": _finite(D.item()),
                            "C": _finite(Cterm.item()), "lr": sched_lr(step)})
            if checkpoint_dir is not None and (time.time() - last_ckpt >= cfg.checkpoint_every_s
                                                   or epoch + 1 == epochs):
                self._save_ckpt(checkpoint_dir, fingerprint, epoch + 1, history, net, ae, opt, params)
                last_ckpt = time.time()

        if skipped:
            notes.append(f"{skipped} of {total} training steps were skipped: their loss or gradient was not finite "
                         "(for instance a warp of some image in the batch reaching the line at infinity)")
        warps = self._align_all(aligner, x)
        return FitResult(in_from_out_norm=warps.float().cpu(), reference_index=ref, aligner=aligner,
                         history=history, notes=notes)

    @staticmethod
    def _distance(cfg, xb, bgb, aligned, Mb, ref_img, ref_bg, sigma) -> torch.Tensor:
        """``D``: L1 between the aligned images and the reference, in the chosen frame(s).

        In the output frame (Eq. 5) input content that the aligned frame leaves
        out costs nothing, so zooming in on a part of the object is cheap. In
        the input frame the reference is warped onto each image instead
        (``warp(ref, M^-1)``), and every pixel of the input must be explained.
        """
        rb = blur(ref_img, sigma)
        terms = []
        if cfg.distance in ("output", "symmetric"):
            terms.append((blur(aligned, sigma) - rb).abs().mean())
        if cfg.distance in ("input", "symmetric"):
            pad = ref_bg if cfg.padding == "border" else None
            ref_in = _warp_bg(ref_img.expand(xb.shape[0], -1, -1, -1), G.invert(Mb), pad)
            terms.append((blur(xb, sigma) - blur(ref_in, sigma)).abs().mean())
        return sum(terms) / len(terms)

    @staticmethod
    def _equivariance(cfg, aligner, xb, bgb, Mb, limit, seed) -> torch.Tensor:
        """Self-supervised consistency: re-warp the batch by random known homographies.

        For ``x'(q) = x(A q)`` a consistent aligner satisfies ``A M(x') = M(x)``
        (both map the aligned frame onto ``x``). We penalise the mean distance
        between the two maps at the output frame's corners, in normalised input
        units, or with ``cfg.equivariance_units == "frame"`` divided by each
        aligned frame's size in the input (then a common zoom does not lower it).
        This pins down the directions the image distance leaves nearly flat,
        which are exactly the ones that make two copies of an image disagree.

        Two kinds of view ``A`` (``cfg.equivariance_frame``):

        * ``"input"``: ``A = P``, the image re-warped where it is. Its
          perturbations add to the collection's own, so large ``P`` push
          already-displaced objects out of the frame.
        * ``"aligned"``: ``A = M(x) P`` with ``M(x)`` held fixed: the image as
          its current alignment sees it, then perturbed. The condition becomes
          ``P M(x') = I``: an aligned image maps to the identity (``P = I``),
          and a perturbation of the aligned frame is undone. These views look
          like the collection itself (aligned content under protocol-like
          warps), whatever the collection's own misalignment, so they can be
          as large as the collection's spread; each image draws its size from
          ``[0, cfg.aligned_sigma]`` so small ones still teach precision.
          Measured worse than ``"input"`` (round 7 in the benchmarks).
        """
        from .perturb import random_perturbations

        H, W = xb.shape[-2:]
        B = xb.shape[0]
        pad = bgb if cfg.padding == "border" else None
        c = G.unit_corners(like=xb)
        target = G.transform_points(Mb, c)  # (B, 4, 2)
        if cfg.equivariance_units == "frame":
            # Linear size of each aligned frame in the input, 1 for the identity: the square root of
            # the quadrilateral's area over the unit frame's 4. It carries gradient, so a common zoom
            # leaves the loss unchanged instead of lowering it. (Holding the image's own warp fixed
            # instead, as the views' target, removes the zoom-in pull too but lets D's zoom-out win:
            # round 9 in the benchmarks.)
            size = (G.polygon_area(target) / 4).clamp_min(1e-4).sqrt()
        else:
            size = torch.ones(B, dtype=xb.dtype, device=xb.device)

        def dist(A_, Mp_):
            return ((G.transform_points(A_ @ Mp_, c) - target).norm(dim=-1).mean(1) / size).mean()

        terms = []
        if cfg.equivariance_frame in ("input", "both"):
            g = torch.Generator().manual_seed(int(seed))
            P_pix = random_perturbations(B, (H, W), cfg.equivariance_sigma, g)
            P = G.normalised_from_pixel(P_pix, (H, W), (H, W)).to(xb)
            terms.append(dist(P, aligner.warps(_warp_bg(xb, P, pad), limit)))
        if cfg.equivariance_frame in ("aligned", "both"):
            g = torch.Generator().manual_seed(int(seed) + 1_000_003)  # its own draws: "both" = input + aligned
            sig = torch.rand(B, generator=g, dtype=torch.float64) * cfg.aligned_sigma
            P_pix = random_perturbations(B, (H, W), sig, g)
            A = Mb.detach() @ G.normalised_from_pixel(P_pix, (H, W), (H, W)).to(xb)
            terms.append(dist(A, aligner.warps(_warp_bg(xb, A, pad), limit)))
        return sum(terms)

    @torch.no_grad()
    def _align_all(self, aligner: DPRCAligner, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        return torch.cat([aligner.align(x[k:k + chunk]) for k in range(0, x.shape[0], chunk)])

    # ------------------------------------------------------------------ checkpoints
    # Safetensors + JSON only: a checkpoint is never unpickled.

    @staticmethod
    def _save_ckpt(d: Path, fp: dict, epoch: int, history: list, net, ae, opt, params) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        t = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        t.update({f"ae.{k}": v.detach().cpu().contiguous() for k, v in ae.state_dict().items()})
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st:
                t[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
                t[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
                t[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        tmp_t, tmp_j = d / "state.safetensors.tmp", d / "state.json.tmp"
        save_file(t, str(tmp_t))
        tmp_j.write_text(json.dumps({"epoch": epoch, "fingerprint": fp, "history": history}))
        # Tensors first, then the JSON that points at them: a crash between the two
        # renames leaves the previous epoch's JSON, which the fingerprint check still accepts.
        os.replace(tmp_t, d / "state.safetensors")
        os.replace(tmp_j, d / "state.json")

    @staticmethod
    def _resume(d: Path, fp: dict, net, ae, opt, params, notes: list) -> tuple[int, list]:
        d = Path(d)
        js, st = d / "state.json", d / "state.safetensors"
        if not js.exists() and not st.exists():
            return 0, []
        try:
            meta = json.loads(js.read_text())
            if meta.get("fingerprint") != fp:
                notes.append("checkpoint belongs to different data or options; started from scratch")
                return 0, []
            t = load_file(str(st))
            keep = ({k: v.clone() for k, v in net.state_dict().items()},
                    {k: v.clone() for k, v in ae.state_dict().items()})
            try:
                net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
                ae.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("ae.")})
            except Exception:
                net.load_state_dict(keep[0])
                ae.load_state_dict(keep[1])
                raise
            dev = next(net.parameters()).device
            for i, p in enumerate(params):
                if f"opt.{i}.exp_avg" in t:
                    opt.state[p] = {
                        "step": t[f"opt.{i}.step"][0].clone(),
                        "exp_avg": t[f"opt.{i}.exp_avg"].to(dev),
                        "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(dev),
                    }
            epoch = int(meta["epoch"])
            notes.append(f"resumed from checkpoint at epoch {epoch}")
            return epoch, list(meta.get("history", []))
        except Exception as e:  # corrupt or truncated: never fatal, never silent
            notes.append(f"checkpoint unreadable ({type(e).__name__}); started from scratch")
            return 0, []
