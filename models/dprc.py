"""Deep Penalised Reconstruction Congealing (Annunziata, Sagonas, Cali; ICCV 2019).

Objective (Eq. 8), minimised end to end with Adam over mini-batches::

    D = | warp(I_i; p_i) - I_ref |_1                                  (Eq. 5)
    C = | AE(warp(I_i; p_i)) - warp(I_i; p_i) |_1 + gamma w^T z_i     (Eq. 7)
    L = D + lambda C

with ``p_i = DeSTNet(I_i)`` and ``w_l = l^k / sum l^k``. We average instead of
summing (a constant scale absorbed by the learning rate).

What we add for robustness (each switchable in :class:`DPRCConfig`, each
measured against ground truth in ``docs/research/quality-rounds-1-9.md``):

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
  ``docs/research/quality-rounds-1-9.md``, round 5, for why the default stays Eq. 5.
* ``passes``: the DeSTNet is applied this many times in a row with the same
  weights, each pass starting from the previous pass's warp, in training and at
  inference. A one-pass aligner under-corrects; a network trained to be
  iterated corrects most of what is left (round 6 in the research log).
* ``reframe``: a fit whose aligned frames keep a median of less than
  ``metrics.CONTENT_KEPT_MIN`` of each image's content (a zoom into the object,
  checked without ground truth) is fitted again with the moment regulariser at
  this weight, and the fit that keeps more content is returned.
* ``width``: Table 1's MNIST DeSTNet has 4 and 8 conv channels; on a GPU the
  default multiplies them (and the regressor) by 4, which lowered the residual on
  every digit (round 7 in the research log). The LFW aligner (64-256 channels)
  keeps its width; on a CPU the default is Table 1's (see :meth:`DPRC.resolved`).
* ``equivariance_frame``: the equivariance views can also be made from each
  image's current aligned frame; measured worse, off by default.
* ``equivariance_units``: the equivariance distance in units of each aligned
  frame's size instead of the input's. In input units the loss itself rewards
  zooming into the object (every distance shrinks), which is why strong
  equivariance weights crop; in frame units it does not, but the fit then
  drifts larger at sigma >= 20 % (round 9 in the research log). ``"auto"`` (the
  default) takes frame units on a GPU from :data:`FRAME_UNITS_FROM` images up: there
  the first fit of larger collections zoomed into the objects in input units
  (content kept 0.68 at 6,000 images, 0.67 at 1,000,000, every time at 1M) and
  kept them whole in frame units (object ratio 0.0845 at 6k, 0.088 at 1M against
  0.192 / 0.167 after the re-fit), while at 1,000 images input units align a
  little better (0.088 against 0.096). The CPU's networks did not zoom in at 6,000
  or 40,000 images and align a little better in input units (0.130 / 0.124 against
  0.133 / 0.132; bench/results/session14/). Frame units let some collections'
  frames drift large (6k digits 7 and 9), so ``units_refit`` fits a frame-unit fit
  that reads less self-consistent than the warning level again in input units and
  keeps the more self-consistent of the two.
* A coarse-to-fine distance (blur annealed from ``blur_start`` to 0), a warp
  curriculum (``curriculum``), background-aware padding (``padding``),
  cosine learning-rate decay.

Reference rule (``reference_index=None``): the image whose blurred version is closest (L1) to the
blurred mean of the collection: a typical, central member (:func:`choose_reference` can restrict
it to typical object sizes; measured, not the default).

How long and on what batches it trains is :mod:`models.schedule`'s (images seen,
chosen from the device and the collection); how a step runs fast is
:mod:`models.dprc_train`'s (blocks of steps, one CUDA graph, no host syncs); a fit
over several processes is :mod:`models.distributed`'s.
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
from .methods import (AlignmentFailed, FitContext, FitResult, Progress, register_aligner, register_method,
                      shard_bounds)
from . import schedule as P_
from .collective import all_gather_rows
from .dprc_train import (MAX_BAD_STEPS, Objective, StepRunner, TrainData, _IndexStream, as_float, curriculum_limit,
                         curriculum_rank,
                         elapsed_eta, make_optimizer, make_tables, noise_width)
from .imageops import background, blur
from .nets import PRESETS, AutoEncoderConfig, DeSTNet, DeSTNetConfig, PenalisedAutoEncoder, set_compute_dtype

DEFAULT_WIDTH = {"mnist": 4.0, "small": 4.0, "lfw": 1.0}
# choose_reference's default size band: 1, every image. A band of 0.2 (a median-size reference) made the
# 1,000-image CPU job's first fit zoom in (content kept 0.69 against 1.00, area 0.56; object ratio
# 0.133 against 0.139): bench/results/session9/reference_band_cpu.jsonl.
REFERENCE_SIZE_BAND = 1.0
# choose_reference picks among at most this many evenly spaced images: the closest image to the blurred
# mean is a larger object the more images it is chosen from (radius 1.18x the median at 1,000,000
# digits, 0.97x at 6,000: bench/results/session8/reference_size.jsonl), and every image is scaled
# after it, so a collection of any size chooses its reference as one of this size does.
REFERENCE_POOL = 8192
# equivariance_units="auto": frame units on a GPU from this many images up, else input units (module notes).
FRAME_UNITS_FROM = 4096
# A fit has collapsed (DPRC._collapse) when its aligned frames keep less than this median share of
# each image's content, scale the objects' area by more than this factor either way, or its aligner is
# less self-consistent than this (1: no better than not aligning), measured on this many images.
COLLAPSE_KEPT, COLLAPSE_AREA, COLLAPSE_CONSISTENCY = M.LOST_KEPT, M.LOST_AREA, 1.0
# ... or when more than COLLAPSE_SHARE of the images are lost one by one (each image's own frame keeps
# less than COLLAPSE_KEPT, scales by more than COLLAPSE_AREA, or left the image: metrics.frames_off):
# medians alone passed a sigma = 30 % canvas fit that had sent a third of the frames off (object
# ratio 2.4; bench/results/session10/call1_robustness.jsonl).
COLLAPSE_SHARE = 0.25

__all__ = ["DEFAULT_WIDTH", "DPRCConfig", "DPRC", "DPRCAligner", "choose_reference", "moment_init", "blur",
           "background", "curriculum_family", "MAX_BAD_STEPS"]


@dataclass(frozen=True)
class DPRCConfig:
    preset: str = "auto"  # "mnist" | "lfw" | "small" | "auto" (mnist up to 48 px a side, else lfw)
    lam: float = 1.0  # lambda, weight of the complexity term C
    gamma: float = 1.0  # weight of the positional code penalty
    k: int = 1  # exponent of the positional weights
    code: int = 64  # |z|
    lr: float = 1e-3
    lr_final: float = 0.02  # cosine decay to lr * lr_final
    # Schedule (models/schedule.py): None = chosen from the device and the collection.
    batch_size: int | None = None  # GPU: 256; CPU: 64
    epochs: int | None = None  # an explicit budget in epochs (overrides steps)
    steps: int | None = None  # an explicit number of steps
    steps_target: int | None = None  # steps of a collection large enough to fill them; None: GPU 1500, CPU 600
    max_epochs: int = 300  # a small collection trains at most this many epochs
    warmup: float = 0.05  # linear learning-rate warm-up (fraction of training), batches above 256 only
    precision: str = "auto"  # network arithmetic: "auto" (bfloat16 on CUDA, float32 elsewhere) | "float32" | "bfloat16"
    graphs: bool = True  # capture the training step as one CUDA graph (single GPU)
    # torch.compile the objective (forward and backward) on a GPU; measured, not the default
    # (docs/benchmarks.md, "Speed"): its compile time is longer than a small job.
    compile: bool = False
    init: str = "moments"  # "moments" (centroid + scale) | "search" (moments, then rotation) | "centroid" | "identity"
    # init="search": after the moments, the rotation about the reference's centroid (every
    # search_step degrees up to +-search_degrees, and mirrored if search_flip) whose blurred
    # image is L1-closest to the blurred reference (models.dprc.rotation_search).
    search_degrees: float = 45.0
    search_step: float = 5.0
    search_flip: bool = False
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
    equivariance_units: str = "auto"
    aligned_sigma: float = 0.15  # "aligned" views: per-image size drawn uniformly from [0, aligned_sigma]
    # "as_is" | "centred": the reference's object moved to the frame centre | "normalised": centred
    # and scaled to the collection's median object size (a strongly perturbed reference can be
    # far larger or smaller than the typical object; every image would be scaled after it)
    reference_frame: str = "as_is"
    reference_band: float = REFERENCE_SIZE_BAND  # choose_reference's size band (1: every image)
    reference_pool: int = REFERENCE_POOL  # choose_reference's candidates: at most this many, evenly spaced
    # Train on at most this many images, evenly spaced (0: all); every image is still aligned.
    train_pool: int = 0
    # Weight of the common-zoom anchor: (batch mean of log(aligned frame area / its initial area))^2.
    # It holds the collection's average frame at the initialisation's scale, while each image's own
    # scale stays free (a zoom common to all images changes no residual, only what the frame keeps).
    zoom_anchor: float = 0.0
    max_scale: float = 2.5  # clamp of the moment initialisation's scale (and of its inverse)
    distance: str = "output"  # D compared in the "output" (reference) frame, the "input" frame, or "symmetric"
    passes: int = 2  # the DeSTNet applied this many times in a row, same weights (trained and at inference)
    stages: int = 0  # DeSTNet stages; 0: the preset's
    # Multiplies the DeSTNet's conv channels and regressor width (1: Table 1's); None: the
    # preset's DEFAULT_WIDTH (4 for the 4-and-8-channel MNIST aligners, measured in round 7;
    # 1 for LFW's, which has 64-256 channels already and was not measured wider).
    width: float | None = None
    # When the fit crops (median content kept < metrics.CONTENT_KEPT_MIN), fit again with this
    # moment_weight and keep the fit that keeps more content; 0: never. See docs/research/quality-rounds-1-9.md.
    reframe: float = 1.0
    # When equivariance_units="auto" chose frame units and the fit's aligner reads less
    # self-consistent than metrics.CONSISTENCY_WARN (the level at which a job warns), fit again in
    # input units and keep the more self-consistent fit. At 6,000 images frame units kept digit 3
    # whole where input units cropped it, but drifted on digits 7 and 9 where input units did not
    # (docs/benchmarks.md, "Jobs, end to end").
    units_refit: bool = True
    # Check the final fit for a collapse (empty, cropped or shrunk images, or an aligner less
    # self-consistent than not aligning) and fall back to the moment alignment, or fail, if it did.
    guard: bool = True
    # Image by image, in the fit and in the saved aligner: a learned warp that strays
    # (metrics.stray_warps: the frame's centre off the image, a corner behind the horizon, or the
    # centre's area scale more than metrics.LOST_AREA-fold from the initial warp's) is replaced by the
    # initial (moment) warp, and the image is flagged (per_image[].fallback). A fit that strays on more
    # than COLLAPSE_SHARE of its images still falls back as a whole (guard).
    fallback: bool = True
    checkpoint_every_s: float = 20.0


# --------------------------------------------------------------------------- helpers

def _finite(v: float | None, digits: int = 6) -> float | None:
    return round(v, digits) if v is not None and math.isfinite(v) else None


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


def _rotations(degrees: float, step: float, flip: bool, like: torch.Tensor) -> torch.Tensor:
    """``(A, 2, 2)``: the search's rotations (0 first), and their mirror images if ``flip``."""
    n = int(math.floor(degrees / step + 1e-9)) if step > 0 else 0
    t = torch.arange(-n, n + 1, dtype=torch.float64) * math.radians(step)
    t = torch.cat([t[n:n + 1], t[:n], t[n + 1:]])  # 0 first: ties keep the moments' own frame
    c, s = torch.cos(t), torch.sin(t)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    if flip:
        R = torch.cat([R, R @ torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)])
    return R.to(like)


def rotation_search(x: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, ref_centroid: torch.Tensor,
                    degrees: float = 45.0, step: float = 5.0, flip: bool = False, blur_px: float | None = None,
                    chunk_pixels: int = 1 << 24) -> torch.Tensor:
    """Each image's initial warp followed by the best rotation about the reference's object.

    ``x`` ``(B, C, H, W)`` images less their background, ``base`` ``(B, 3, 3)`` their initial
    ``in_from_out_norm`` (the moment initialisation), ``ref`` ``(1, C, H, W)`` the reference less
    its background, ``ref_centroid`` ``(2,)`` its object's centroid (normalised). For every
    rotation of :func:`_rotations` (about the centroid, in pixel-isotropic units), ``x`` is
    resampled through ``base`` composed with it, blurred (``blur_px``; default 4 % of the shorter
    side), and compared with the blurred reference (L1); the closest wins. A coarse global search
    in front of the network, so that strongly rotated objects start in its basin. Returns
    ``(B, 3, 3)``.
    """
    B, C, H, W = x.shape
    blur_px = 0.04 * min(H, W) if blur_px is None else blur_px
    R2 = _rotations(degrees, step, flip, base)  # (A, 2, 2)
    A = R2.shape[0]
    if A == 1:
        return base
    # Rotations in pixel-isotropic units about the centroid: T(c) S^-1 R S T(-c), S = diag(W-1, H-1) / 2.
    sx, sy = max(W - 1, 1) / 2.0, max(H - 1, 1) / 2.0
    S = base.new_tensor([[sx, 0.0], [0.0, sy]])
    Si = base.new_tensor([[1 / sx, 0.0], [0.0, 1 / sy]])
    L = Si @ R2 @ S  # (A, 2, 2)
    rot = torch.zeros(A, 3, 3, dtype=base.dtype, device=base.device)
    rot[:, :2, :2] = L
    rot[:, :2, 2] = ref_centroid.to(base) - (L @ ref_centroid.to(base))
    rot[:, 2, 2] = 1
    target = blur(ref.to(x), blur_px)
    best = torch.empty(B, dtype=torch.long, device=x.device)
    step_b = max(1, chunk_pixels // (A * C * H * W))
    for k in range(0, B, step_b):
        xb, Mb = x[k:k + step_b], base[k:k + step_b]
        b = xb.shape[0]
        M = (Mb[:, None] @ rot[None]).reshape(b * A, 3, 3)  # (b*A, 3, 3)
        xr = G.warp(xb.repeat_interleave(A, 0), M, (H, W))
        d = (blur(xr, blur_px) - target).abs().mean(dim=(1, 2, 3)).view(b, A)
        best[k:k + b] = d.argmin(1)
    return base @ rot[best]


def moment_penalty(aligned: torch.Tensor, bg: torch.Tensor, ref_c: torch.Tensor,
                   ref_r: torch.Tensor) -> torch.Tensor:
    """Mean of ``|c - c_ref|_1 + |log(r / r_ref)|`` over the batch (foreground moments).

    Differentiable through the warp: it keeps each aligned object where the
    reference's is and as large, which removes the degenerate optima of ``D``
    and ``C`` (shrinking, zooming out, sliding out of the frame).
    """
    c, r, _ = _moments(aligned, bg)
    return ((c - ref_c).abs().sum(1) + (r / ref_r).log().abs()).mean()


def choose_reference(x: torch.Tensor, bg: torch.Tensor | None = None, chunk: int = 4096, world: int = 1,
                     start: int = 0, band: float = REFERENCE_SIZE_BAND, pool: int = REFERENCE_POOL) -> int:
    """Index of the image whose blurred version is L1-closest to the blurred mean, among the
    images whose foreground RMS radius lies in the central ``band`` of the collection's radii
    (1, the default: every image; 0.2: the 40th to 60th percentiles), and among at most ``pool``
    candidates: every ``ceil(N / pool)``-th image of the collection (all of them up to ``pool``).

    The closest image to the blurred mean is a larger object the more images there are to choose
    from (at 1,000,000 infiMNIST-style digits its radius was 1.18x the median, the 90th
    percentile; at 6,000, 0.97x; ``bench/reference_size.py``), and the moment initialisation
    scales every image after the reference. A median-size reference (band 0.2) is not the cure:
    at 1,000 images on the CPU it made the first fit zoom in and crop (see
    :data:`REFERENCE_SIZE_BAND`); a bounded pool (:data:`REFERENCE_POOL`) makes a large
    collection choose as a collection of the pool's size does (and blurs only the candidates a second time).

    ``x`` ``(N, C, H, W)`` uint8 or float, ``bg`` its backgrounds ``(N, C, 1, 1)`` (computed if
    None). With ``world > 1`` it is this process's shard of the collection, whose first image has
    the global index ``start``, and the index is global.
    """
    sigma = 0.06 * min(x.shape[-2:])
    mean = torch.zeros((1, *x.shape[1:]), dtype=torch.float32, device=x.device)
    radius = []
    for k in range(0, x.shape[0], chunk):
        xf = as_float(x[k:k + chunk])
        mean += blur(xf, sigma).sum(0, keepdim=True)
        radius.append(_moments(xf, background(xf) if bg is None else bg[k:k + chunk].to(xf))[1])
    radius = torch.cat(radius)
    n = torch.tensor(float(x.shape[0]), device=x.device)
    everyone = radius
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(mean)
        dist.all_reduce(n)
        everyone = all_gather_rows(radius, x.device)
    mean /= n
    stride = max(1, math.ceil(int(n.item()) / max(1, int(pool))))
    # This process's candidates: the images whose global index is a multiple of the stride.
    cand = torch.arange((-start) % stride, x.shape[0], stride, device=x.device)
    d = torch.full((x.shape[0],), math.inf, dtype=torch.float32, device=x.device)
    for k in range(0, cand.numel(), chunk):
        i = cand[k:k + chunk]
        d[i] = (blur(as_float(x[i]), sigma) - mean).abs().mean(dim=(1, 2, 3))
    if band < 1 and everyone.numel() > 1:
        v = everyone.double().sort().values  # (torch.quantile refuses more than 16M values)
        m = v.numel() - 1
        lo, hi = v[int(math.floor((0.5 - band / 2) * m))], v[int(math.ceil((0.5 + band / 2) * m))]
        typical = (radius.double() >= lo) & (radius.double() <= hi)
        d = torch.where(typical, d, torch.full_like(d, math.inf))
    best = int(d.argmin())
    if world <= 1:
        return best
    # The global minimum, ties to the lowest index: (distance, index) compared across processes.
    pairs = all_gather_rows(torch.tensor([[float(d[best]), float(start + best)]], dtype=torch.float64), x.device)
    return int(min((float(p[0]), float(p[1])) for p in pairs)[1])


def train_pool(n: int, pool: int, world: int = 1) -> torch.Tensor | None:
    """The local indices training draws from when ``pool`` caps it: ``ceil(pool / world)`` evenly
    spaced images of this process's ``n``; None (every image) when ``pool`` is 0 or not below ``n``."""
    k = math.ceil(pool / max(1, world)) if pool > 0 else 0
    return M.evenly_spaced(n, k) if 0 < k < n else None


def curriculum_family(family: str, frac: float, schedule) -> str | None:
    """The family training is limited to at progress ``frac`` in [0, 1], or None for no limit.

    ``schedule[r]`` is the fraction of training at which the family of rank
    ``r`` (translation, similarity, affine, homography) unlocks.
    """
    return curriculum_limit(family, curriculum_rank(family, frac, schedule))


# --------------------------------------------------------------------------- aligner


class DPRCAligner:
    """A trained DPRC aligner: moment initialisation + DeSTNet, one forward pass."""

    method = "dprc"
    reproduces_fit = True  # align() on the fitted images gives the fit's warps (the same float32 pass)

    def __init__(self, net: DeSTNet, init: str, ref_centroid: torch.Tensor, ref_radius: torch.Tensor,
                 padding: str = "border", max_scale: float = 2.5, passes: int = 1,
                 ref_image: torch.Tensor | None = None, search: dict | None = None, fallback: bool = False):
        self.net = net.eval()
        # align(): an image whose learned warp strays (models.metrics.stray_warps: the frame's centre
        # off the image, a corner behind the horizon, or the centre's area scale LOST_AREA-fold from
        # the initial warp's) gets its initial warp instead (DPRCConfig.fallback)
        self.fallback = fallback
        self.init = init
        self.ref_centroid = ref_centroid
        self.ref_radius = ref_radius
        self.padding = padding
        self.max_scale = max_scale
        self.passes = passes
        # init="search": the reference less its background (1, C, H, W), and the search's
        # degrees, step and flip (models.dprc.rotation_search).
        self.ref_image = ref_image
        self.search = dict(search or {})
        if init == "search" and ref_image is None:
            raise ValueError("init='search' needs the reference image")

    def base(self, x: torch.Tensor, search: bool = True) -> torch.Tensor | None:
        """The initial warps ``(B, 3, 3)`` the DeSTNet starts from (None: the identity);
        ``search=False`` leaves the rotation search out (it keeps each frame's area)."""
        if self.init not in ("moments", "centroid", "search"):
            return None
        M0 = moment_init(x, self.ref_centroid.to(x), self.ref_radius.to(x), max_scale=self.max_scale,
                         scale=self.init != "centroid")
        if self.init != "search" or not search:
            return M0
        with torch.no_grad():
            return rotation_search(x - background(x), M0, self.ref_image, self.ref_centroid, **self.search)

    def warps(self, x: torch.Tensor, limit: str | None = None, passes: int | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 3, 3)`` ``in_from_out_norm``, differentiable.

        Each pass after the first starts the DeSTNet from the previous pass's
        warp (the original image is still resampled once per stage), so a
        network that corrects a fraction of the misalignment per pass is
        iterated towards its fixed point.
        """
        return self._warps_from(x, self.base(x), limit, passes)

    def _warps_from(self, x: torch.Tensor, M0: torch.Tensor | None, limit: str | None = None,
                    passes: int | None = None) -> torch.Tensor:
        xin = x - background(x) if self.padding == "border" else x
        M_ = M0
        for _ in range(self.passes if passes is None else passes):
            M_ = self.net(xin, M_, limit)
        return M_

    @torch.no_grad()
    def align(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 or float images -> ``(B, 3, 3)`` ``in_from_out_norm``."""
        return self.align_flagged(images)[0]

    @torch.no_grad()
    def align_flagged(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`align`, and which images got their initial warp instead of the learned one
        ``(B,)`` bool (None when ``fallback`` is off)."""
        x = as_float(images)
        M0 = self.base(x)
        M_ = self._warps_from(x, M0)
        if not self.fallback:
            return M_, None
        start = torch.eye(3, dtype=M_.dtype, device=M_.device).expand_as(M_) if M0 is None else M0.to(M_.dtype)
        stray = M.stray_warps(M_, start)
        return torch.where(stray[:, None, None], start, M_), stray

    def save(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        cfg = {"method": "dprc", "init": self.init, "padding": self.padding, "max_scale": self.max_scale,
               "passes": self.passes, "destnet": asdict(self.net.cfg), "search": self.search,
               "fallback": self.fallback}
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=1))
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["ref_centroid"] = self.ref_centroid.detach().cpu().float()
        tensors["ref_radius"] = self.ref_radius.detach().cpu().float().reshape(1)
        if self.ref_image is not None:
            tensors["ref_image"] = self.ref_image.detach().cpu().float().contiguous()
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
    ref_image = t["ref_image"].to(device) if "ref_image" in t else None
    return DPRCAligner(net.to(device), cfg["init"], t["ref_centroid"].to(device),
                       t["ref_radius"].to(device)[0], cfg.get("padding", "border"), cfg.get("max_scale", 2.5),
                       int(cfg.get("passes", 1)), ref_image, cfg.get("search"), bool(cfg.get("fallback", False)))


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
        for name, allowed in (("init", ("moments", "search", "centroid", "identity")), ("padding", ("border", "zeros")),
                              ("reference_frame", ("as_is", "centred", "normalised")),
                              ("distance", ("output", "input", "symmetric")),
                              ("equivariance_frame", ("input", "aligned", "both")),
                              ("equivariance_units", ("auto", "input", "frame")),
                              ("preset", ("auto", *PRESETS))):
            if getattr(self.cfg, name) not in allowed:
                raise ValueError(f"dprc option {name}={getattr(self.cfg, name)!r}; choose one of {', '.join(allowed)}")

    def resolved(self, device_type: str, size: tuple[int, int], n: int = 0) -> DPRCConfig:
        """The configuration with every device-, size- and collection-dependent default made concrete.

        On a GPU: Table 1's auto-encoder (``mnist`` up to 48 px a side, ``lfw`` above), the MNIST
        DeSTNet at 4x its width, 1,500 steps. On a CPU: the narrow ``small`` auto-encoder up to 48 px,
        Table 1's DeSTNet width, 600 steps of 64 (docs/benchmarks.md, "On a CPU": the GPU defaults
        take ~40 min for 1,000 images on 2 cores; 450 steps left the self-consistency check at 0.53, a
        warning on every job). For ``n`` images (the whole collection's): the equivariance distance
        in frame units on a GPU from :data:`FRAME_UNITS_FROM` images up. An option the job sets is kept as set.
        """
        cfg = self.cfg
        cpu = device_type != "cuda"
        preset = cfg.preset
        if preset == "auto":
            preset = ("small" if cpu else "mnist") if max(size) <= 48 else "lfw"
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or auto")
        width = cfg.width if cfg.width is not None else (1.0 if cpu else DEFAULT_WIDTH[preset])
        steps_target = cfg.steps_target if cfg.steps_target is not None else (600 if cpu else 1500)
        precision = cfg.precision if cfg.precision != "auto" else ("float32" if cpu else "bfloat16")
        units = cfg.equivariance_units
        if units == "auto":
            units = "frame" if not cpu and n >= FRAME_UNITS_FROM else "input"
        return replace(cfg, preset=preset, width=width, steps_target=steps_target, precision=precision,
                       equivariance_units=units)

    def _nets(self, C: int, size: tuple[int, int], warp: str, cfg: DPRCConfig) -> tuple[DeSTNet, PenalisedAutoEncoder]:
        """The two networks of a resolved configuration (:meth:`resolved`)."""
        p = PRESETS[cfg.preset]
        d = dict(p["destnet"])
        if cfg.stages:
            d["stages"] = int(cfg.stages)
        if cfg.width != 1:
            d["convs"] = tuple((k, max(1, round(ch * cfg.width)), s) for k, ch, s in d["convs"])
            d["hidden"] = round(d["hidden"] * cfg.width)
        dcfg = DeSTNetConfig(in_channels=C, image_size=size, warp=warp, bound=cfg.bound, **d)
        acfg = AutoEncoderConfig(in_channels=C, image_size=size, code=cfg.code, k=cfg.k, **p["ae"])
        return DeSTNet(dcfg), PenalisedAutoEncoder(acfg)

    def fit(self, images: torch.Tensor, ctx: FitContext, bg: torch.Tensor | None = None) -> FitResult:
        """``images``: ``(N, C, H, W)`` uint8 (0-255) or float (0-1) on the training device, this
        process's shard in a distributed job; ``bg``: their backgrounds ``(N, C, 1, 1)`` if known.

        Raises :class:`AlignmentFailed` when even the safe fallback loses the images."""
        data = TrainData(images, _backgrounds(images) if bg is None else bg.to(images.device))
        cfg = self.resolved(images.device.type, tuple(images.shape[-2:]), ctx.n_total or images.shape[0])
        res = self._fit(data, ctx, cfg, ctx.checkpoint_dir)
        if cfg.reframe > 0 and cfg.moment_weight <= 0:
            res = self._reframe(data, ctx, cfg, res)
        if cfg.units_refit and self.cfg.equivariance_units == "auto" and cfg.equivariance_units == "frame":
            res = self._units_refit(data, ctx, cfg, res)
        if cfg.guard:
            res = self._guard(data, ctx, cfg, res)
        return res

    def _reframe(self, data: TrainData, ctx: FitContext, cfg: DPRCConfig, res: FitResult) -> FitResult:
        """Fit again with the moment regulariser when the first fit crops (see ``reframe``)."""
        t0 = time.perf_counter()
        kept = self._framing(data, res.in_from_out_norm, ctx)[0]
        res.timings["framing_check"] = round(time.perf_counter() - t0, 3)
        if kept >= M.CONTENT_KEPT_MIN:
            return res
        # The output-frame distance lets the aligner zoom into part of the object
        # (thin digits, objects half out of the frame). The moment regulariser keeps
        # the whole object but costs consistency where nothing was cropped, so it is
        # only paid for where the first fit cropped.
        ctx.report(Progress("training", message=f"the alignment keeps a median {kept:.2f} of each image's "
                            f"content; fitting again with moment_weight={cfg.reframe}"))
        ck = None if ctx.checkpoint_dir is None else Path(ctx.checkpoint_dir) / "reframe"
        try:
            res2 = self._fit(data, ctx, replace(cfg, moment_weight=cfg.reframe), ck)
        except FloatingPointError as e:
            # The re-fit is a second opinion; its failure must not lose the first fit.
            res.notes.append(f"the first fit kept a median {kept:.2f} of each image's content; a re-fit with "
                             f"moment_weight={cfg.reframe} failed ({e}); using the first fit")
            return res
        kept2 = self._framing(data, res2.in_from_out_norm, ctx)[0]
        res2.timings = {**res.timings, **{f"refit_{k}": v for k, v in res2.timings.items()}}
        res.timings = res2.timings
        note = (f"the first fit kept a median {kept:.2f} of each image's content; a re-fit with "
                f"moment_weight={cfg.reframe} kept {kept2:.2f}")
        best = res2 if kept2 > kept else res
        best.notes.append(note + ("; using the re-fit" if best is res2 else "; using the first fit"))
        return best

    def _units_refit(self, data: TrainData, ctx: FitContext, cfg: DPRCConfig, res: FitResult) -> FitResult:
        """Fit again in input units when the frame-unit fit is not self-consistent (``units_refit``)."""
        t0 = time.perf_counter()
        ratio = self._consistency(data, ctx, res)
        res.timings["units_check"] = round(time.perf_counter() - t0, 3)
        if ratio is None or ratio <= M.CONSISTENCY_WARN:
            return res
        ctx.report(Progress("training", message=f"the alignment's self-consistency ratio is {ratio:.2f} "
                            f"(> {M.CONSISTENCY_WARN}); fitting again with the equivariance in input units"))
        cfg2 = replace(cfg, equivariance_units="input")
        ck = None if ctx.checkpoint_dir is None else Path(ctx.checkpoint_dir) / "input_units"
        try:
            res2 = self._fit(data, ctx, cfg2, ck)
            if cfg.reframe > 0 and cfg.moment_weight <= 0:
                res2 = self._reframe(data, ctx, cfg2, res2)
        except FloatingPointError as e:
            res.notes.append(f"the fit in frame units read a self-consistency ratio of {ratio:.2f}; a re-fit in "
                             f"input units failed ({e}); using the first fit")
            return res
        ratio2 = self._consistency(data, ctx, res2)
        timings = {**res.timings, **{f"units_refit_{k}": v for k, v in res2.timings.items()}}
        best = res2 if ratio2 is not None and ratio2 < ratio else res
        best.timings = timings
        best.notes.append(f"the fit with the equivariance in frame units read a self-consistency ratio of "
                          f"{ratio:.2f}, a re-fit in input units {ratio2 if ratio2 is None else round(ratio2, 2)}; "
                          f"using the {'re-fit' if best is res2 else 'first fit'}")
        return best

    def _consistency(self, data: TrainData, ctx: FitContext, res: FitResult) -> float | None:
        """The fit's self-consistency ratio at the objects (``metrics.json``'s ``object_ratio``: a
        known re-warp's effect on the aligned frame over the re-warp's own, on a sample of
        :data:`metrics.CONSISTENCY_SAMPLE` images; every process's in a distributed job)."""
        if res.aligner is None:
            return None
        moved, probe = M.sampled_self_consistency(res.aligner.align, data.x, res.in_from_out_norm,
                                                  bg=data.bg, seed=ctx.seed)
        stats = torch.stack([moved.sum(), probe.sum()]).to(data.x.device, torch.float64)
        if ctx.world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        return float(stats[0] / stats[1].clamp_min(1e-12))

    def _collapse(self, data: TrainData, ctx: FitContext, res: FitResult) -> str | None:
        """Why ``res`` lost the images, checked without ground truth (None: it did not).

        Collapsed: the aligned frames keep less than :data:`COLLAPSE_KEPT` of the median image's
        content (empty or cropped images), show the objects at less than 1/:data:`COLLAPSE_AREA` or
        more than that many times their area (shrunk away, or a blow-up of a fragment), more than
        :data:`COLLAPSE_SHARE` of the images are lost one by one in those ways or by a frame that left
        the image (:meth:`_framing_rows`), or the
        aligner is less self-consistent than not aligning at all (``metrics.json``'s
        ``consistency_summary`` check, measured at each image's object pixels rather than at the
        frame's corners, on a sample of :data:`metrics.CONSISTENCY_SAMPLE` images)."""
        kept_i, area_i, far_i = self._framing_rows(data, res.in_from_out_norm, ctx)
        kept, area = float(kept_i.nanmedian()), float(area_i.nanmedian())
        if kept < COLLAPSE_KEPT:
            return f"its aligned frames keep a median {kept:.2f} of each image's content"
        if not 1 / COLLAPSE_AREA <= area <= COLLAPSE_AREA:
            return f"its aligned frames show the objects at {1 / area:.2g} times their area"
        far_i = far_i | ~torch.isfinite(kept_i) | ~torch.isfinite(area_i)
        if res.fallback is not None:  # frames that strayed count as lost though they got the initial warp
            far_i = far_i | (all_gather_rows(res.fallback.float(), data.x.device).bool().cpu()
                             if ctx.world > 1 else res.fallback)
        lost = far_i | M.lost_images(kept_i, area_i)
        share = float(lost.float().mean())
        if share > COLLAPSE_SHARE:
            return (f"{share:.0%} of the images are lost one by one: {int(far_i.sum())} aligned frames left the "
                    "image or strayed from the initial warp, "
                    f"{int((~far_i & (kept_i < COLLAPSE_KEPT)).sum())} more keep less than {COLLAPSE_KEPT:.0%} of the "
                    f"content, and {int((~far_i & (kept_i >= COLLAPSE_KEPT) & lost).sum())} more scale the object's "
                    f"area more than {COLLAPSE_AREA:g}-fold")
        ratio = self._consistency(data, ctx, res)
        if ratio is not None and ratio > COLLAPSE_CONSISTENCY:
            return (f"its aligner is less self-consistent than not aligning (a known 10 % re-warp of each image "
                    f"moves where its aligned frame puts the object {ratio:.2f} times as far as the re-warp itself)")
        return None

    def _guard(self, data: TrainData, ctx: FitContext, cfg: DPRCConfig, res: FitResult) -> FitResult:
        """Never return a collapsed fit: fall back to the moment alignment, or fail with the reason.

        The fallback is the same aligner untrained: the moment initialisation (translation and
        isotropic scale from each image's foreground moments onto the reference's) behind a
        DeSTNet at the identity, a model ``congeal apply`` can use like any other."""
        t0 = time.perf_counter()
        why = self._collapse(data, ctx, res)
        res.timings["collapse_check"] = round(time.perf_counter() - t0, 3)
        if why is None:
            return res
        ctx.report(Progress("training", message=f"the learned alignment collapsed ({why}); "
                                                "falling back to the moment alignment"))
        safe = self._safe_fit(data, ctx, cfg, res)
        why_safe = self._collapse(data, ctx, safe)
        if why_safe is not None:
            raise AlignmentFailed(f"the collection could not be aligned: the learned alignment collapsed ({why}), "
                                  f"and so did the moment alignment ({why_safe}); check that the images show one "
                                  "kind of object on a plain or consistent background")
        warning = (f"the learned alignment collapsed ({why}), so this result is the safe moment alignment "
                   "(translation and scale from each image's foreground moments onto the reference's), not a "
                   "learned one; its images are aligned only coarsely. Options that may help: a less general "
                   "--warp (similarity or affine), a --reference image showing a typical, whole object")
        safe.warnings.append(warning)
        safe.notes.extend(res.notes)
        safe.notes.append(f"fallback: {warning}")
        safe.timings = {**res.timings, "fallback": safe.timings.get("aligning", 0.0)}
        return safe

    def _safe_fit(self, data: TrainData, ctx: FitContext, cfg: DPRCConfig, res: FitResult) -> FitResult:
        """The moment alignment as a fit: the trained aligner's initialisation and reference, its
        networks untrained (a DeSTNet starts at the identity)."""
        al = res.aligner
        N, C, H, W = data.x.shape
        net, _ = self._nets(C, (H, W), ctx.warp, cfg)
        safe = DPRCAligner(net.to(data.x.device), "moments", al.ref_centroid, al.ref_radius, al.padding,
                           al.max_scale, 1)
        t0 = time.perf_counter()
        warps, _ = self._align_all(safe, data.x)
        return FitResult(in_from_out_norm=warps.float().cpu(), reference_index=res.reference_index, aligner=safe,
                         history=res.history, plan=res.plan, timings={"aligning": round(time.perf_counter() - t0, 3)})

    @staticmethod
    def _framing(data: TrainData, in_from_out_norm: torch.Tensor, ctx: FitContext | None = None,
                 chunk: int = 8192) -> tuple[float, float]:
        """Median content kept and median area scale over the collection (every process's shard
        in a distributed job); see :func:`models.metrics.framing`."""
        kept, area, _ = DPRC._framing_rows(data, in_from_out_norm, ctx, chunk)
        return float(kept.nanmedian()), float(area.nanmedian())

    @staticmethod
    def _framing_rows(data: TrainData, in_from_out_norm: torch.Tensor, ctx: FitContext | None = None,
                      chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image ``(N,)`` (every process's shard in a distributed job): content kept, area
        scale (:func:`models.metrics.framing`), and whether the aligned frame left the image
        (:func:`models.metrics.frames_off`: its centre half an image outside, behind the horizon, or
        not finite)."""
        size = tuple(data.x.shape[-2:])
        kept, area, far = [], [], []
        for k in range(0, len(data), chunk):
            x = as_float(data.x[k:k + chunk]).double()
            Mn = in_from_out_norm[k:k + chunk].double().to(x.device)
            pix = G.pixel_from_normalised(Mn, size, size)
            f = M.framing(x, pix, size, data.bg[k:k + chunk].double())
            kept.append(f[0].cpu())
            area.append(f[1].cpu())
            far.append(M.frames_off(Mn).cpu())
        kept, area, far = torch.cat(kept).float(), torch.cat(area).float(), torch.cat(far).float()
        if ctx is not None and ctx.world > 1:
            kept, area, far = (all_gather_rows(v, data.x.device) for v in (kept, area, far))
        return kept, area, far.bool()

    def _fit(self, data: TrainData, ctx: FitContext, cfg: DPRCConfig, checkpoint_dir: Path | None) -> FitResult:
        x = data.x
        dev = x.device
        N, C, H, W = x.shape
        G.get_family(ctx.warp)
        t_setup = time.perf_counter()
        torch.manual_seed(ctx.seed)
        net, ae = self._nets(C, (H, W), ctx.warp, cfg)
        amp = torch.bfloat16 if cfg.precision == "bfloat16" else None
        net, ae = set_compute_dtype(net, amp), set_compute_dtype(ae, amp)
        net = net.to(dev, memory_format=torch.channels_last)
        ae = ae.to(dev, memory_format=torch.channels_last)
        params = list(net.parameters()) + list(ae.parameters())
        n_all = ctx.n_total if ctx.world > 1 else N
        plan = P_.plan(n_all, dev.type, batch_size=cfg.batch_size, steps=cfg.steps,
                       epochs=cfg.epochs if ctx.budget is None else ctx.budget, steps_target=cfg.steps_target,
                       max_epochs=cfg.max_epochs, lr=cfg.lr, lr_final=cfg.lr_final, warmup=cfg.warmup,
                       world=ctx.world)
        opt = make_optimizer(params, plan.lr, dev)
        t_nets = _lap(dev)

        ref_img, ref, ref_bg = _reference(data, ctx, cfg.reference_band, cfg.reference_pool)
        ref_c, ref_r, _ = _moments(ref_img, ref_bg)
        ref_c, ref_r = ref_c[0], ref_r[0]
        if cfg.reference_frame in ("centred", "normalised"):
            # A strongly perturbed reference can sit half out of the frame, or be far larger
            # or smaller than the typical object; every image is pulled after it. Centring
            # (and scaling to the median size) costs nothing when the reference is typical.
            scale = 1.0
            if cfg.reference_frame == "normalised":
                scale = min(max(float(ref_r / _median_radius(data, ctx)), 1 / cfg.max_scale), cfg.max_scale)
            T = torch.eye(3, dtype=ref_img.dtype, device=dev)[None].clone()
            T[0, 0, 0] = T[0, 1, 1] = scale
            T[0, :2, 2] = ref_c
            ref_img = G.warp(ref_img, T, (H, W), fill=ref_bg)
            ref_c, ref_r = torch.zeros_like(ref_c), ref_r / scale
        aligner = DPRCAligner(net, cfg.init, ref_c, ref_r, cfg.padding, cfg.max_scale, cfg.passes,
                              ref_img - ref_bg if cfg.init == "search" else None,
                              dict(degrees=cfg.search_degrees, step=cfg.search_step, flip=cfg.search_flip)
                              if cfg.init == "search" else None, fallback=cfg.fallback)
        objective = Objective(aligner, ae, cfg, ref_img, ref_bg, ref_c, ref_r, cfg.blur_start * min(H, W))
        t_ref = _lap(dev)
        model = objective
        if cfg.compile and dev.type == "cuda" and ctx.world == 1:
            model = torch.compile(objective, dynamic=False)
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                        find_unused_parameters=cfg.lam <= 0, broadcast_buffers=False)

        notes: list[str] = []
        history: list[dict] = []
        fingerprint = {"n": n_all, "shape": [C, H, W], "warp": ctx.warp, "seed": ctx.seed, "world": ctx.world,
                       "reference": ref, "config": json.loads(json.dumps(asdict(cfg))), "plan": plan.to_dict()}
        start = 0
        if checkpoint_dir is not None:
            start, history = self._resume(checkpoint_dir, fingerprint, net, ae, opt, params, notes)
            if start:
                ctx.report(Progress("training", step=start, total=plan.steps, epoch=int(start * plan.batch_size / n_all),
                                    message=f"resumed from checkpoint at step {start} "
                                            f"(epoch {int(start * plan.batch_size / n_all)})"))

        # Steps per block: on a GPU enough that the host's once-a-block sync costs nothing; on a
        # CPU, where reading a value costs nothing, one (progress, checkpoints and cancellation at
        # every step, as before).
        block = 64 if dev.type == "cuda" else 1
        every = max(1, plan.steps // 200)  # history: about 200 points
        runner = StepRunner(model, objective, opt, params, data, ctx.warp, block, plan.batch_size // ctx.world,
                            noise_width(cfg), use_graph=cfg.graphs, world=ctx.world, notes=notes)
        stream = _IndexStream(N, ctx.seed * ctx.world + ctx.rank if ctx.world > 1 else ctx.seed,
                              train_pool(N, cfg.train_pool, ctx.world))
        net.train()
        ae.train()
        skipped = bad_run = 0
        # networks (and the device's first kernels), the reference, the rest (checkpoint, runner)
        # (a dotted key breaks the stage before the dot down; it is not a stage of its own)
        timings = {"setup": round(time.perf_counter() - t_setup, 3), "setup.networks": round(t_nets - t_setup, 3),
                   "setup.reference": round(t_ref - t_nets, 3)}
        t_train = time.perf_counter()
        t0, last_ckpt = time.time(), time.time()
        last_loss = None
        step = start
        while step < plan.steps:
            k = min(block, plan.steps - step)
            tables = make_tables(step, k, plan, cfg, ctx.warp, (H, W), stream, ctx.seed, ctx.rank, ctx.world)
            res = runner.run(tables, ctx.check_stop)
            for j, sk in enumerate(res.skipped):
                skipped += sk
                bad_run = bad_run + 1 if sk else 0
                if bad_run >= MAX_BAD_STEPS:
                    raise FloatingPointError(f"training diverged: {bad_run} steps in a row up to step {step + j + 1} "
                                             f"had a non-finite loss or gradient")
                if not sk:
                    last_loss = res.loss[j]
            step += k
            if step % every < k or step == plan.steps:
                history.append({"step": step, "epoch": round(step * plan.batch_size / n_all, 3),
                                "loss": _finite(res.loss[-1]), "D": _finite(res.D[-1]),
                                "C": _finite(res.C[-1]), "lr": plan.lr_at(step - 1)})
            ctx.report(Progress("training", step=step, total=plan.steps, epoch=int(step * plan.batch_size / n_all),
                                loss=last_loss,
                                apsnr=M.apsnr(res.last_aligned) if res.last_aligned is not None and
                                res.last_aligned.shape[0] > 1 else None,
                                eta_s=elapsed_eta(t0, step - start, plan.steps - step)))
            if checkpoint_dir is not None and ctx.rank == 0 and (
                    time.time() - last_ckpt >= cfg.checkpoint_every_s or step == plan.steps):
                self._save_ckpt(checkpoint_dir, fingerprint, step, int(step * plan.batch_size / n_all), history,
                                net, ae, opt, params)
                last_ckpt = time.time()

        if skipped:
            notes.append(f"{skipped} of {plan.steps} training steps were skipped: their loss or gradient was not "
                         "finite (for instance a warp of some image in the batch reaching the line at infinity)")
        notes.append(f"schedule: {plan.batch_size} images a step, {plan.steps} steps ({plan.epochs:.1f} epochs), "
                     f"peak learning rate {plan.lr:.3g}; aligner {cfg.preset} preset at width {cfg.width:g}, "
                     f"{cfg.precision} arithmetic on {dev.type}"
                     + (", equivariance in frame units" if cfg.equivariance > 0 and cfg.equivariance_units == "frame" else "")
                     + (f", {ctx.world} processes" if ctx.world > 1 else "")
                     + (" with a captured CUDA graph" if runner.graph is not None else ""))
        # The job's warps come from the same float32 forward pass as `congeal apply` on a saved model.
        set_compute_dtype(net, None)
        timings["training"] = round(time.perf_counter() - t_train, 3)
        t_align = time.perf_counter()
        warps, fallback = self._align_all(aligner, x)
        timings["aligning"] = round(time.perf_counter() - t_align, 3)
        return FitResult(in_from_out_norm=warps.float().cpu(), reference_index=ref, aligner=aligner,
                         history=history, notes=notes, plan=plan.to_dict(), timings=timings, fallback=fallback)

    @torch.no_grad()
    def _align_all(self, aligner: DPRCAligner, x: torch.Tensor, chunk: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every image's warp ``(N, 3, 3)`` (CPU) and which got the fallback ``(N,)`` (None: off)."""
        chunk = chunk or (16384 if x.device.type == "cuda" else 1024)
        aligner.net.eval()
        parts = [aligner.align_flagged(x[k:k + chunk]) for k in range(0, x.shape[0], chunk)]
        flags = torch.cat([f.cpu() for _, f in parts]) if aligner.fallback else None
        return torch.cat([w.cpu() for w, _ in parts]), flags

    # ------------------------------------------------------------------ checkpoints
    # Safetensors + JSON only: a checkpoint is never unpickled.

    @staticmethod
    def _save_ckpt(d: Path, fp: dict, step: int, epoch: int, history: list, net, ae, opt, params) -> None:
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
        tmp_j.write_text(json.dumps({"step": step, "epoch": epoch, "fingerprint": fp, "history": history}))
        # Tensors first, then the JSON that points at them: a crash between the two
        # renames leaves the previous checkpoint's JSON, which the fingerprint check still accepts.
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
                    # The moments take the parameter's memory layout (channels-last convolutions):
                    # fused Adam walks parameter, gradient and moments as one flat range.
                    opt.state[p] = {
                        "step": t[f"opt.{i}.step"][0].clone().to(dev),
                        "exp_avg": torch.empty_like(p).copy_(t[f"opt.{i}.exp_avg"]),
                        "exp_avg_sq": torch.empty_like(p).copy_(t[f"opt.{i}.exp_avg_sq"]),
                    }
            step = int(meta["step"])
            notes.append(f"resumed from checkpoint at step {step} (epoch {meta.get('epoch', 0)})")
            return step, list(meta.get("history", []))
        except Exception as e:  # corrupt or truncated: never fatal, never silent
            notes.append(f"checkpoint unreadable ({type(e).__name__}); started from scratch")
            return 0, []


# --------------------------------------------------------------------------- collection-wide statistics
# Over every process's shard in a distributed job (all-reduces), over the data otherwise.


def _lap(dev: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (for stage timings)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _backgrounds(x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([background(as_float(x[k:k + chunk])) for k in range(0, x.shape[0], chunk)])


def _reference(data: TrainData, ctx: FitContext, band: float = REFERENCE_SIZE_BAND, pool: int = REFERENCE_POOL
               ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The reference image ``(1, C, H, W)`` float, its global index, and its background ``(1, C, 1, 1)``."""
    x = data.x
    if ctx.reference_index is not None:
        ref = int(ctx.reference_index)
    else:
        ref = choose_reference(x, data.bg, world=ctx.world, start=ctx.shard_start, band=band, pool=pool)
    if ctx.world <= 1:
        return as_float(x[ref:ref + 1]), ref, data.bg[ref:ref + 1]
    import bisect

    import torch.distributed as dist

    bounds = shard_bounds(ctx.n_total, ctx.world)
    owner = bisect.bisect_right(bounds, ref) - 1
    local = ref - bounds[owner]
    img = as_float(x[local:local + 1]).clone() if ctx.rank == owner else torch.zeros_like(as_float(x[:1]))
    bg = data.bg[local:local + 1].clone() if ctx.rank == owner else torch.zeros_like(data.bg[:1])
    dist.broadcast(img, src=owner)
    dist.broadcast(bg, src=owner)
    return img, ref, bg


def _median_radius(data: TrainData, ctx: FitContext, chunk: int = 4096) -> torch.Tensor:
    """Median foreground RMS radius of the collection, normalised units, 0-d."""
    r = torch.cat([_moments(as_float(data.x[k:k + chunk]), data.bg[k:k + chunk])[1]
                   for k in range(0, len(data), chunk)])
    if ctx.world > 1:
        r = all_gather_rows(r, data.x.device)
    return r.median()
