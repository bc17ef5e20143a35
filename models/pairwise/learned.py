"""Homography with a descriptor learned from scratch on the pair (Dong, Boots, Dellaert, Sinha; 3DV 2018).

A small patch-descriptor CNN is trained on the two images themselves, jointly with the
eight homography parameters, by minimising one contrastive loss (Eq. 5): patches around
keypoints of the target and the patches the current homography says correspond to them
in the source are positives, pairs of patches of different keypoints are negatives.
Patches are resampled bilinearly from the current homography at every step (Eq. 6), so
the loss is differentiable in the homography and its gradient moves it.

Implemented as in the paper:

* the siamese network Conv(32, 5x5)-Tanh-MaxPool(2)-Conv(64, 3x3)-Tanh-FC on 16 x 16
  patches (Section 5.3), with the first layer unshared between the two images by default
  (the partially shared pseudo-siamese network, Section 4.4; ``shared_first_layer``);
* the contrastive loss with margin (Eqs. 1, 3);
* the scale-normalised homography parametrisation (Section 5.1, Eq. 9): the paper divides
  the translation by the image size and multiplies the perspective terms by it so that
  all eight parameters move image points by comparable amounts; the homography's entries
  in the product's normalised coordinates ([-1, 1] across each image, :mod:`models.geometry`)
  are exactly that, so the parameters are those entries minus the identity;
* keypoints drawn uniformly among pixels whose gradient magnitude (of the image
  standardised to mean 0, variance 1) exceeds ``contrast``, with random orientation and
  log-uniform scale (Section 5.3), and kept only where the warped keypoint lies inside
  the other image;
* the keypoint's frame warped through the homography by finite differences (Eqs. 10-12,
  ``patch_warp="keypoint"``), or every sample of the patch mapped through it
  (``patch_warp="homography"``, exact under shear and perspective);
* coarse to fine on an image pyramid whose coarsest level has about ``coarsest`` pixels
  on its longer side; the homography carries over between levels, the network is
  discarded (Section 5.3).

Where we differ, and why (measurements in docs/benchmarks.md, "Pairwise homographies"):

* Adam, with the learning rate of the homography in pixels of the current level and a
  cosine decay, instead of SGD with momentum: the step size of each parameter then no
  longer depends on the scale of its gradient.
* The negatives are the other keypoints of the same step (every non-matching pair
  at least ``negative_distance`` pixels apart), not a fixed random set: they cost no
  extra patches.
* Shifted negatives (``hard_negatives``): each keypoint's source patch moved 2-4 px off
  where the homography puts it. With far-apart negatives only, the network learns to match
  the current misalignment and the homography stops moving (camera pair 3.6 -> 1.3 px).
* A global search for the start (``search``, on by default; :mod:`models.pairwise.search`): the
  paper needs a rough initial alignment, and DeTone-style pairs (corners moved by up to a quarter of
  the image) mostly start outside the joint fit's basin. Classic closed-form computations, nothing
  pretrained: a similarity search by FFT correlation of unsigned gradient-orientation histograms
  (which survive the changes of modality), then block matching + RANSAC rounds to a full homography,
  then a dense sub-pixel refinement (``search_refine``, ECC on orientation fields, kept only where it
  raises their correlation). From there the paper's joint fit runs on the finest level
  (``search_steps``): the network alone for the first ``warmup`` steps, then the network and the
  homography, the homography with a smaller step (``search_lr_homography``). The search and the
  refinement alone are the pair method ``search`` (:mod:`models.pairwise.searched`);
  ``search_joint=False`` holds the homography (the network then trains for ``descriptor_share``
  only, and the matrix is the ``search`` method's). On the benchmark the joint fit moves the
  homography from the search's answer mostly away from the truth (under 1 px: 84 -> 59 % of the
  same-modality pairs, 100 -> 56 % of the cross-modal ones; docs/benchmarks.md, "Pairwise
  homographies"): the paper's method, kept honest, not the default.
* Multi-start (``starts``, with ``search=False``): several initial homographies (the identity and
  shifted copies of it; more starts add rotated, scaled and farther-shifted ones) are fitted side by
  side for ``start_steps`` at the coarsest level, each with its own network, and every pair keeps
  the one whose learned descriptor matches best (:func:`_retrieval`). With the search,
  ``search_starts`` of its best candidates are tried the same way.
* A confidence (``confidence="blocks"``, :func:`models.pairwise.search.block_agreement`): the
  target is cut into blocks, each textured block is matched on its own against the source warped by
  the final homography (the refinement's orientation field, shifts within 8 px), and the confidence
  is the share of blocks whose own best shift is within a pixel of where the homography puts them
  (four disagreeing blocks added to the count). Unrelated images, or a fit that failed, score near
  zero. The learned descriptor's retrieval share (fresh keypoints described by the pair's own
  network, the share whose nearest source descriptor is their correspondent's) is kept beside it
  (``LearnedFit.descriptor_share``; ``confidence="descriptor"`` makes it the confidence): it ranked
  correctly aligned cross-modal pairs as low as unrelated ones (docs/research/pairwise-capture.md).

Batched: every pair of a call (times ``starts`` at the coarsest level) has its own network
and homography, stored as grouped-convolution weights, and they all train in one step.
The loss is a sum over pairs, and Adam is elementwise, so each pair trains exactly as it
would alone. Device and dtype follow the images.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .. import geometry as G
from .methods import ConfigPairMethod, register_pair_method
from .search import SearchConfig, block_agreement, global_search, refine_homography

__all__ = ["LearnedConfig", "LearnedFit", "LearnedMethod", "fit_pairs", "homography_from_params", "params_from_homography",
           "start_homographies", "pyramid_sizes"]


@dataclass(frozen=True)
class LearnedConfig:
    """Options of the learned method (``--option KEY=VALUE`` on the command line)."""

    patch: int = 16  # patch side, samples (Section 5.3)
    channels: tuple[int, int] = (32, 64)  # the two conv layers
    descriptor: int = 128  # descriptor length
    shared_first_layer: bool = False  # True: fully siamese; False: the paper's partially shared network
    keypoints: int = 64  # keypoints per pair and step (positives; every other keypoint is a negative)
    steps: tuple[int, ...] = (60, 60, 200)  # steps per pyramid level, coarsest first; the last repeats
    coarsest: int = 32  # longer side of the coarsest pyramid level, pixels
    max_levels: int = 5
    lr: float = 3e-3  # network (Adam)
    lr_homography: float = 0.5  # homography, in pixels of the current level per step (Adam)
    lr_final: float = 0.02  # cosine decay to lr * lr_final within each level
    margin: float = 1.0  # contrastive margin, on unit-length descriptors
    negative_distance: float = 3.0  # negatives: keypoints at least this far apart, pixels of the level
    # Shifted negatives: each keypoint's source patch moved this far (pixels of the level, a range);
    # None: none. They make the descriptor, and so the loss, sensitive to misalignment at that scale.
    hard_negatives: tuple[float, float] | None = (2.0, 4.0)
    contrast: float = 0.05  # gradient-magnitude threshold for keypoints (standardised image)
    scale: tuple[float, float] = (1.0, 2.0)  # keypoint scale range (pixels per patch sample), log-uniform
    patch_warp: str = "homography"  # "homography" | "keypoint" (Eqs. 10-12)
    starts: int = 9  # initial homographies tried at the coarsest level (1: the identity only)
    start_shift: float = 0.25  # their translations, fraction of the image (normalised units / 2)
    start_steps: int | None = 30  # coarsest-level steps before the best start is kept; None: the whole level
    # Global search for the start (models/pairwise/search.py): similarities by FFT correlation of
    # orientation features, then block matching + RANSAC; replaces the fixed starts above.
    search: bool = True
    search_size: int = 64  # longer side of the similarity search's level, px
    search_candidates: int = 6  # similarities refined by block matching, ranked by their correlation
    search_starts: int = 1  # of those, how many the learned fit tries (multi-start, as with `starts`)
    search_steps: tuple[int, ...] = (100,)  # after the search: steps per level, finest last (its length: levels)
    # After the search: a dense sub-pixel refinement (search.refine_homography: ECC on orientation
    # fields, 64 then 128 px), kept only where it raises the correlation.
    search_refine: bool = True
    # After the search: move the homography with the learned loss (the paper's joint fit). False holds
    # it: the network then trains on the pair at the searched homography for descriptor_share only, and
    # the matrix and the confidence are those of the pair method `search` (models/pairwise/searched.py).
    search_joint: bool = True
    search_lr_homography: float = 0.15  # with search_joint: the homography's step, px of the level
    warmup: int = 30  # with search_joint: first steps of each level that train the network alone
    eval_keypoints: int = 256  # keypoints of the descriptor's retrieval share
    # The confidence: "blocks" (search.block_agreement: the share of the target's textured blocks
    # that, matched on their own, agree with the homography to within a pixel) or "descriptor" (the
    # learned descriptor's retrieval share, the confidence until helper/pairwise-conf)
    confidence: str = "blocks"
    seed: int = 0

    def __post_init__(self):
        if self.confidence not in ("blocks", "descriptor"):
            raise ValueError(f"confidence must be 'blocks' or 'descriptor', not {self.confidence!r}")
        if self.patch_warp not in ("homography", "keypoint"):
            raise ValueError(f"patch_warp must be 'homography' or 'keypoint', not {self.patch_warp!r}")
        if self.patch < 8:
            raise ValueError("patch must be at least 8 samples")
        if self.search_starts < 1 or self.search_candidates < self.search_starts:
            raise ValueError("search_candidates >= search_starts >= 1 are needed")
        if self.starts < 1 or self.keypoints < 4 or not self.steps or min(self.steps) < 1:
            raise ValueError("starts >= 1, keypoints >= 4 and at least one step per level are needed")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LearnedFit:
    """What :func:`fit_pairs` returns."""

    source_from_target_norm: torch.Tensor  # (B, 3, 3), normalised coordinates
    confidence: torch.Tensor  # (B,) in [0, 1]: cfg.confidence's measure
    descriptor_share: torch.Tensor  # (B,) in [0, 1]: the learned descriptor's retrieval share
    loss: torch.Tensor  # (B,) final contrastive loss of each pair
    start: torch.Tensor  # (B,) index of the start each pair kept
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- parametrisation


def homography_from_params(p: torch.Tensor) -> torch.Tensor:
    """Scale-normalised parameters ``(B, 8)`` -> ``source_from_target_norm`` ``(B, 3, 3)``; 0 is the identity."""
    return G.params_to_matrix(p, "homography")


def params_from_homography(M: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`homography_from_params`, ``(B, 3, 3) -> (B, 8)``."""
    return G.matrix_to_params(M, "homography")


def start_homographies(n: int, shift: float, *, like: torch.Tensor) -> torch.Tensor:
    """``n`` initial homographies ``(n, 3, 3)`` in normalised coordinates: the identity first, then
    translations by ``shift`` of the image in the 8 compass directions, then rotations by +-15 deg
    and scalings by 0.8 and 1.25, then translations twice as far; cycled if ``n`` is larger."""
    t = 2.0 * shift  # normalised units span 2 across the image
    cands = [(0.0, 0.0, 0.0, 1.0)]
    cands += [(t * math.cos(a), t * math.sin(a), 0.0, 1.0) for a in (k * math.pi / 4 for k in range(8))]
    cands += [(0.0, 0.0, r, 1.0) for r in (math.radians(15), -math.radians(15))]
    cands += [(0.0, 0.0, 0.0, s) for s in (0.8, 1.25)]
    cands += [(2 * t * math.cos(a), 2 * t * math.sin(a), 0.0, 1.0) for a in (k * math.pi / 4 for k in range(8))]
    out = []
    for i in range(n):
        tx, ty, r, s = cands[i % len(cands)]
        c, si = s * math.cos(r), s * math.sin(r)
        out.append(((c, -si, tx), (si, c, ty), (0.0, 0.0, 1.0)))
    return torch.tensor(out, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- images


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Each image and channel to mean 0, variance 1 (Section 5.3), ``(B, C, H, W)``."""
    m = x.mean(dim=(-2, -1), keepdim=True)
    s = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (x - m) / s


def pyramid_sizes(size: tuple[int, int], coarsest: int, max_levels: int) -> list[tuple[int, int]]:
    """Level sizes ``(H, W)``, coarsest first, halving from ``size`` while the longer side stays
    at least ``coarsest``."""
    h, w = size
    sizes = [(h, w)]
    while len(sizes) < max_levels and max(h, w) / 2 >= coarsest * 0.99:
        h, w = max(8, round(h / 2)), max(8, round(w / 2))
        sizes.append((h, w))
    return sizes[::-1]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W)``: central differences, largest over channels."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return (gx.square() + gy.square()).sqrt().amax(dim=1)


# --------------------------------------------------------------------------- keypoints and patches


def _patch_offsets(patch: int, like: torch.Tensor) -> torch.Tensor:
    """Sample offsets of a patch around its centre, ``(P*P, 2)`` (x, y), unit spacing."""
    r = torch.arange(patch, dtype=like.dtype, device=like.device) - (patch - 1) / 2
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=-1)


def _keypoints(weights: torch.Tensor, k: int, cfg: LearnedConfig, gen: torch.Generator,
               size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` keypoints per image where ``weights`` ``(B, H*W)`` is positive: centres ``(B, k, 2)``
    (pixels, sub-pixel jitter), orientations ``(B, k)`` and scales ``(B, k)``."""
    B = weights.shape[0]
    H, W = size
    dev, dt = weights.device, weights.dtype
    idx = torch.multinomial(weights, k, replacement=True, generator=gen)  # (B, k)
    jit = torch.rand(B, k, 2, generator=gen, device=dev, dtype=dt) - 0.5
    xy = torch.stack([(idx % W).to(dt), (idx // W).to(dt)], dim=-1) + jit
    theta = torch.rand(B, k, generator=gen, device=dev, dtype=dt) * (2 * math.pi)
    lo, hi = math.log(cfg.scale[0]), math.log(cfg.scale[1])
    scale = torch.exp(lo + (hi - lo) * torch.rand(B, k, generator=gen, device=dev, dtype=dt))
    return xy, theta, scale


def _frame_points(xy: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Patch sample positions of similarity frames: ``(B, k, 2)``, ``(B, k)``, ``(B, k)`` -> ``(B, k, S, 2)``."""
    c, s = torch.cos(theta) * scale, torch.sin(theta) * scale
    ox, oy = offsets[:, 0], offsets[:, 1]  # (S,)
    x = xy[..., 0, None] + c[..., None] * ox - s[..., None] * oy
    y = xy[..., 1, None] + s[..., None] * ox + c[..., None] * oy
    return torch.stack([x, y], dim=-1)


def _sample(images: torch.Tensor, pts_pix: torch.Tensor, patch: int) -> torch.Tensor:
    """Bilinear patches: ``images`` ``(B, C, H, W)``, ``pts_pix`` ``(B, k, P*P, 2)`` -> ``(B, k, C, P, P)``.
    Outside the image samples are 0 (the standardised mean)."""
    B, C, H, W = images.shape
    k = pts_pix.shape[1]
    norm = G.normaliser(H, W, like=pts_pix)
    grid = pts_pix * norm.diagonal()[:2] + norm[:2, 2]  # pixels -> normalised, align_corners=True
    out = G.sample_grid(images, grid.view(B, k * patch, patch, 2), "bilinear", "zeros")  # (B, C, k*P, P)
    return out.view(B, C, k, patch, patch).transpose(1, 2)


def _to_pixels(M_norm: torch.Tensor, src_size, tgt_size) -> torch.Tensor:
    return G.pixel_from_normalised(M_norm, tuple(src_size), tuple(tgt_size))


def _warp_frames(M_pix: torch.Tensor, xy: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, eps: float = 0.5):
    """Eqs. 10-12: a keypoint's position through the homography, and its orientation and scale from
    the image of a short vector along its orientation (finite differences)."""
    d = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1) * (eps * scale[..., None])
    both = torch.cat([xy, xy + d], dim=1)  # (B, 2k, 2)
    mapped = G.transform_points(M_pix, both)
    c, e = mapped.split(xy.shape[1], dim=1)
    v = (e - c) / eps
    return c, torch.atan2(v[..., 1], v[..., 0]), v.norm(dim=-1)


# --------------------------------------------------------------------------- the batched networks


class _Networks:
    """``n`` independent descriptor networks, as grouped-convolution weights.

    Conv(c1, 5x5)-Tanh-MaxPool(2)-Conv(c2, 3x3)-Tanh-FC(d), unit-length output. The first
    layer has one weight for target patches and one for source patches unless shared.
    Initialised like ``torch.nn``'s layers (uniform, fan-in).
    """

    def __init__(self, n: int, c_target: int, c_source: int, cfg: LearnedConfig, gen: torch.Generator,
                 like: torch.Tensor):
        c1, c2 = cfg.channels
        P = cfg.patch
        self.n, self.cfg = n, cfg
        self.side = ((P - 4) // 2) - 2  # spatial side after conv5, pool2, conv3
        if self.side < 1:
            raise ValueError(f"patch {P} is too small for the network")

        def u(shape, fan_in):
            b = 1.0 / math.sqrt(fan_in)
            t = (torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype) * 2 - 1) * b
            return t.requires_grad_()

        self.w1t, self.b1t = u((n * c1, c_target, 5, 5), c_target * 25), u((n * c1,), c_target * 25)
        if cfg.shared_first_layer:
            if c_source != c_target:
                raise ValueError("a shared first layer needs images with the same number of channels")
            self.w1s, self.b1s = self.w1t, self.b1t
        else:
            self.w1s, self.b1s = u((n * c1, c_source, 5, 5), c_source * 25), u((n * c1,), c_source * 25)
        self.w2, self.b2 = u((n * c2, c1, 3, 3), c1 * 9), u((n * c2,), c1 * 9)
        fan = c2 * self.side ** 2
        self.wf, self.bf = u((n, cfg.descriptor, fan), fan), u((n, cfg.descriptor), fan)

    def parameters(self) -> list[torch.Tensor]:
        ps = [self.w1t, self.b1t, self.w2, self.b2, self.wf, self.bf]
        return ps if self.cfg.shared_first_layer else ps + [self.w1s, self.b1s]

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the networks ``idx`` ``(m,)`` (fresh leaves: a new optimiser follows)."""
        c1, c2 = self.cfg.channels

        def rows(w, per):
            return w.detach().view(self.n, per, *w.shape[1:])[idx].reshape(-1, *w.shape[1:]).requires_grad_()

        shared = self.cfg.shared_first_layer
        self.w1t, self.b1t = rows(self.w1t, c1), rows(self.b1t, c1)
        self.w1s, self.b1s = (self.w1t, self.b1t) if shared else (rows(self.w1s, c1), rows(self.b1s, c1))
        self.w2, self.b2 = rows(self.w2, c2), rows(self.b2, c2)
        self.wf, self.bf = self.wf.detach()[idx].requires_grad_(), self.bf.detach()[idx].requires_grad_()
        self.n = int(idx.numel())

    def __call__(self, patches: torch.Tensor, source: bool) -> torch.Tensor:
        """``(n, k, C, P, P)`` -> unit descriptors ``(n, k, d)``."""
        n, k, C, P, _ = patches.shape
        x = patches.transpose(0, 1).reshape(k, n * C, P, P)  # (k, n*C, P, P): one group per network
        w1, b1 = (self.w1s, self.b1s) if source else (self.w1t, self.b1t)
        x = torch.tanh(F.conv2d(x, w1, b1, groups=n))
        x = F.max_pool2d(x, 2)
        x = torch.tanh(F.conv2d(x, self.w2, self.b2, groups=n))  # (k, n*c2, s, s)
        x = x.reshape(k, n, -1)
        d = torch.einsum("kni,ndi->nkd", x, self.wf) + self.bf[:, None]
        return F.normalize(d, dim=-1)


# --------------------------------------------------------------------------- the loss


@dataclass
class _Level:
    """One pyramid level of a batch: standardised images and where keypoints may be drawn."""

    source: torch.Tensor  # (n, Cs, Hs, Ws)
    target: torch.Tensor  # (n, Ct, Ht, Wt)
    weights: torch.Tensor  # (n, Ht*Wt): where target keypoints may be drawn

    def select(self, idx: torch.Tensor) -> "_Level":
        return _Level(self.source[idx], self.target[idx], self.weights[idx])


def _level(source: torch.Tensor, target: torch.Tensor, size_s, size_t, cfg: LearnedConfig) -> _Level:
    s = _standardise(_resize(source, size_s))
    t = _standardise(_resize(target, size_t))
    g = _gradient_magnitude(t).flatten(1)  # (n, Ht*Wt)
    w = (g > cfg.contrast).to(t.dtype)
    # An image without contrast anywhere still gets keypoints (uniform): its fit then fails visibly.
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    return _Level(s, t, w)


def _source_side(nets: _Networks, lv: _Level, M_norm: torch.Tensor, xy, theta, scale, cfg: LearnedConfig):
    """Descriptors of the source patches ``M_norm`` says correspond to target keypoint frames
    ``xy`` ``(n, k, 2)`` (pixels of the target), ``theta``, ``scale`` ``(n, k)``; and which are usable
    ``(n, k)`` (the warped centre inside the source)."""
    P = cfg.patch
    size_s, size_t = lv.source.shape[-2:], lv.target.shape[-2:]
    M_pix = _to_pixels(M_norm, size_s, size_t)
    offs = _patch_offsets(P, xy)
    if cfg.patch_warp == "keypoint":
        c, th, sc = _warp_frames(M_pix, xy, theta, scale)
        pts_s = _frame_points(c, th, sc, offs)
    else:
        pts_t = _frame_points(xy, theta, scale, offs)  # (n, k, S, 2)
        n, k, S, _ = pts_t.shape
        pts_s = G.transform_points(M_pix, pts_t.reshape(n, k * S, 2)).view(n, k, S, 2)
        c = G.transform_points(M_pix, xy)
    Hs, Ws = size_s
    valid = ((c[..., 0] >= 0) & (c[..., 0] <= Ws - 1) & (c[..., 1] >= 0) & (c[..., 1] <= Hs - 1)
             & torch.isfinite(c).all(-1)).to(xy.dtype)
    pts_s = torch.nan_to_num(pts_s, nan=-1e4, posinf=-1e4, neginf=-1e4)
    return nets(_sample(lv.source, pts_s, P), source=True), valid


def _target_side(nets: _Networks, lv: _Level, xy, theta, scale, cfg: LearnedConfig) -> torch.Tensor:
    """Descriptors of target patches at keypoint frames, ``(n, k, d)``."""
    pts_t = _frame_points(xy, theta, scale, _patch_offsets(cfg.patch, xy))
    return nets(_sample(lv.target, pts_t, cfg.patch), source=False)


def _pairs(nets: _Networks, lv: _Level, M_norm: torch.Tensor, xy, theta, scale, cfg: LearnedConfig):
    """Target descriptors ``(n, k, d)``, their source correspondents' ``(n, k, d)`` and usability ``(n, k)``."""
    ds, valid = _source_side(nets, lv, M_norm, xy, theta, scale, cfg)
    return _target_side(nets, lv, xy, theta, scale, cfg), ds, valid


def _hard_negatives(nets: _Networks, lv: _Level, M_norm: torch.Tensor, dt, xy, theta, scale, valid,
                    cfg: LearnedConfig, gen: torch.Generator) -> torch.Tensor:
    """Mean squared hinge ``(n,)`` against source patches of the same frames moved by
    ``hard_negatives`` pixels (of the target, in a random direction) from where the homography puts
    them: a descriptor that cannot tell them apart gives the homography no gradient at that scale."""
    n, k = xy.shape[:2]
    lo, hi = cfg.hard_negatives
    r = lo + (hi - lo) * torch.rand(n, k, generator=gen, device=xy.device, dtype=xy.dtype)
    a = torch.rand(n, k, generator=gen, device=xy.device, dtype=xy.dtype) * (2 * math.pi)
    moved = xy + torch.stack([torch.cos(a), torch.sin(a)], dim=-1) * r[..., None]
    dn, vn = _source_side(nets, lv, M_norm, moved, theta, scale, cfg)
    w = valid * vn
    return (F.relu(cfg.margin - (dt - dn).norm(dim=-1)).square() * w).sum(1) / w.sum(1).clamp_min(1.0)


def _contrastive(dt, ds, valid, xy, cfg: LearnedConfig) -> torch.Tensor:
    """Eq. 3 per pair ``(n,)``: mean squared distance of the positives plus the mean squared hinge
    ``max(0, margin - d)^2`` over negatives (keypoints at least ``negative_distance`` apart)."""
    pos = (dt - ds).square().sum(-1)  # (n, k)
    nv = valid.sum(1).clamp_min(1.0)
    l_pos = (pos * valid).sum(1) / nv
    d = torch.cdist(dt, ds)  # (n, k, k): target k against source j
    far = (torch.cdist(xy, xy) >= cfg.negative_distance).to(d.dtype)
    mask = far * valid[:, :, None] * valid[:, None, :]
    l_neg = (F.relu(cfg.margin - d).square() * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)
    return l_pos + l_neg


@torch.no_grad()
def _retrieval(nets: _Networks, lv: _Level, M_norm: torch.Tensor, cfg: LearnedConfig,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of fresh target keypoints whose nearest source descriptor (among the source patches of
    all the fresh keypoints) is their own correspondent, ``(n,)``; and the contrastive loss there."""
    xy, theta, scale = _keypoints(lv.weights, cfg.eval_keypoints, cfg, gen, tuple(lv.target.shape[-2:]))
    dt, ds, valid = _pairs(nets, lv, M_norm, xy, theta, scale, cfg)
    d = torch.cdist(dt, ds)  # (n, k, k)
    near = (torch.cdist(xy, xy) < cfg.negative_distance) & ~torch.eye(d.shape[1], dtype=torch.bool, device=d.device)
    d = d.masked_fill(near | (valid[:, None, :] == 0), float("inf"))  # near-duplicates are not competitors
    hit = (d.argmin(-1) == torch.arange(d.shape[1], device=d.device)).to(dt.dtype)
    # A pair whose homography sends (almost) nothing into the source has nothing to show.
    share = (hit * valid).sum(1) / valid.sum(1).clamp_min(1.0) * (valid.mean(1) >= 0.1).to(dt.dtype)
    return share, _contrastive(dt, ds, valid, xy, cfg)


# --------------------------------------------------------------------------- the fit


def _cosine(step: int, total: int, final: float) -> float:
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def _train_level(nets: _Networks, p: torch.Tensor, lv: _Level, steps: int, cfg: LearnedConfig,
                 gen: torch.Generator, should_stop: Callable[[], None] | None,
                 trace: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Adam on the networks and the homography parameters ``p`` ``(n, 8)`` (a leaf) for ``steps``;
    returns the last step's loss per pair."""
    Ht, Wt = lv.target.shape[-2:]
    lr_h = cfg.lr_homography * 2.0 / max(1, max(Ht, Wt) - 1)  # pixels of this level -> normalised
    opt = torch.optim.Adam([{"params": nets.parameters(), "lr": cfg.lr}, {"params": [p], "lr": lr_h}])
    base = [g["lr"] for g in opt.param_groups]
    loss = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    for step in range(steps):
        if should_stop is not None:
            should_stop()
        f = _cosine(step, steps, cfg.lr_final)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        if step < cfg.warmup:
            opt.param_groups[1]["lr"] = 0.0
        xy, theta, scale = _keypoints(lv.weights, cfg.keypoints, cfg, gen, (Ht, Wt))
        M = homography_from_params(p)
        dt, ds, valid = _pairs(nets, lv, M, xy, theta, scale, cfg)
        loss = _contrastive(dt, ds, valid, xy, cfg)
        if cfg.hard_negatives is not None:
            loss = loss + _hard_negatives(nets, lv, M, dt, xy, theta, scale, valid, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # a sum: each pair's gradient is its own
        # A non-finite step (a degenerate homography) must not spread NaN into that pair's Adam state.
        for t in [p, *nets.parameters()]:
            if t.grad is not None:
                t.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        if trace is not None:
            trace(step, p.detach(), loss.detach())
    return loss.detach()


def _at(trace, level: int):
    return None if trace is None else (lambda step, p, loss: trace(level, step, p, loss))


@torch.enable_grad()  # the fit is gradient descent, even when called under no_grad
def fit_pairs(source: torch.Tensor, target: torch.Tensor, cfg: LearnedConfig = LearnedConfig(),
              init: torch.Tensor | None = None, progress: Callable[[int, int, str], None] | None = None,
              should_stop: Callable[[], None] | None = None,
              trace: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None) -> LearnedFit:
    """Fit a homography to each pair.

    Args:
        source: ``(B, Cs, Hs, Ws)`` float in [0, 1].
        target: ``(B, Ct, Ht, Wt)`` float in [0, 1]; the channel counts may differ (then the
            first layer must not be shared).
        init: optional ``(B, 3, 3)`` ``source_from_target_norm`` to start from (instead of the
            global search; the multi-start at the coarsest level then starts around it).
        progress: ``progress(step, total, stage)`` after every level.
        should_stop: called at every step; raise from it to stop.
        trace: ``trace(level, step, params, loss)`` after every step (diagnostics: ``bench/``).

    Returns:
        :class:`LearnedFit`; ``source_from_target_norm`` maps normalised target coordinates to
        normalised source coordinates (``target(p) ~ source(M p)``).
    """
    if source.ndim != 4 or target.ndim != 4 or source.shape[0] != target.shape[0]:
        raise ValueError(f"source and target must be (B, C, H, W) with one B, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    B = source.shape[0]
    dev, dt = source.device, source.dtype
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    searched = init is None and cfg.search
    if searched:
        # The start is already within a pixel or two: the joint fit runs on the finest levels only,
        # with a smaller homography step, after a warm-up of the network alone.
        cfg = replace(cfg, steps=tuple(cfg.search_steps), max_levels=len(cfg.search_steps), coarsest=1,
                      lr_homography=cfg.search_lr_homography,
                      warmup=cfg.warmup if cfg.search_joint else max(cfg.search_steps))
    else:
        cfg = replace(cfg, warmup=0)
    sizes_s = pyramid_sizes(tuple(source.shape[-2:]), cfg.coarsest, cfg.max_levels)
    sizes_t = pyramid_sizes(tuple(target.shape[-2:]), cfg.coarsest, cfg.max_levels)
    levels = min(len(sizes_s), len(sizes_t))
    sizes_s, sizes_t = sizes_s[-levels:], sizes_t[-levels:]
    steps = [cfg.steps[min(i, len(cfg.steps) - 1)] for i in range(levels)]
    total = sum(steps)

    history: list[dict] = []
    if searched:
        scfg = SearchConfig(size=cfg.search_size, candidates=cfg.search_candidates,
                            keep=min(cfg.search_candidates, max(SearchConfig.keep, cfg.search_starts)))
        cands, scores = global_search(source, target, scfg, generator=gen, should_stop=should_stop)  # best first
        S = min(cfg.search_starts, cands.shape[1])
        M0 = cands[:, :S].reshape(B * S, 3, 3)
        history.append({"search_scores": scores.tolist(), "search_starts": cands.tolist()})
        if cfg.search_refine:
            M0, refined = refine_homography(source.repeat_interleave(S, 0), target.repeat_interleave(S, 0), M0, scfg)
            history.append({"refined": M0.view(B, S, 3, 3).tolist(), "refine_scores": refined.view(B, S).tolist()})
    else:
        S = cfg.starts
        base = init.to(dev, dt) if init is not None else torch.eye(3, dtype=dt, device=dev).expand(B, 3, 3)
        starts = start_homographies(S, cfg.start_shift, like=source)  # (S, 3, 3), in the target's frame
        M0 = (base[:, None] @ starts[None]).reshape(B * S, 3, 3)  # pair-major: row b*S + s
    p = params_from_homography(M0).detach().clone().requires_grad_()
    rows = torch.arange(B, device=dev).repeat_interleave(S)
    done = 0
    chosen = torch.zeros(B, dtype=torch.long, device=dev)
    loss = torch.zeros(B, dtype=dt, device=dev)
    nets = None
    for li in range(levels):
        lv = _level(source, target, sizes_s[li], sizes_t[li], cfg)
        if li == 0 and S > 1:
            lv_all = lv.select(rows)
            nets = _Networks(B * S, target.shape[1], source.shape[1], cfg, gen, like=source)
            n0 = steps[0] if cfg.start_steps is None else min(cfg.start_steps, steps[0])
            _train_level(nets, p, lv_all, n0, cfg, gen, should_stop, _at(trace, li))
            share, eval_loss = _retrieval(nets, lv_all, homography_from_params(p.detach()), cfg, gen)
            # The start whose own descriptor retrieves best; ties (e.g. all 0) by the lower loss.
            score = (share - 1e-3 * eval_loss).view(B, S)
            chosen = score.argmax(1)
            keep = torch.arange(B, device=dev) * S + chosen
            history.append({"level": li, "size": list(sizes_t[li]), "start_scores": score.tolist()})
            p = p.detach()[keep].clone().requires_grad_()
            nets.select(keep)
            rest = steps[0] - n0
            if rest > 0:
                loss = _train_level(nets, p, lv, rest, cfg, gen, should_stop, _at(trace, li))
        else:
            nets = _Networks(B, target.shape[1], source.shape[1], cfg, gen, like=source)
            loss = _train_level(nets, p, lv, steps[li], cfg, gen, should_stop, _at(trace, li))
        done += steps[li]
        history.append({"level": li, "size": list(sizes_t[li]), "loss": loss.tolist()})
        if progress is not None:
            progress(done, total, "training")
    M = homography_from_params(p.detach())
    share, _ = _retrieval(nets, lv, M, cfg, gen)
    if cfg.confidence == "blocks":
        agree, counted = block_agreement(source, target, M, SearchConfig())
        history.append({"block_agreement": agree.tolist(), "blocks_counted": counted.tolist(),
                        "descriptor_share": share.tolist()})
        confidence = agree
    else:
        confidence = share
    return LearnedFit(M, confidence, share, loss, chosen, history)


# --------------------------------------------------------------------------- the registered method


@register_pair_method("learned")
class LearnedMethod(ConfigPairMethod):
    """The pair method ``learned``: :func:`fit_pairs` with a :class:`LearnedConfig` from options (by
    default the global search, the refinement, then the joint fit of the network and the homography)."""

    name = "learned"
    config_cls = LearnedConfig
    # The confidence below which a pair is reported as not aligned (bench/pairwise.py measures it on
    # aligned pairs and on unrelated images; docs/pairwise.md): with block agreement, about a quarter
    # of the textured blocks must agree with the homography.
    min_confidence = 0.25

    @staticmethod
    def fit(source, target, cfg, progress, should_stop):
        return fit_pairs(source, target, cfg, progress=progress, should_stop=should_stop)
