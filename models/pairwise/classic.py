"""Classic references for pairwise homographies: SIFT / ORB + RANSAC and ECC (OpenCV), and
kornia's ``ImageRegistrator``.

They are optional (``pip install 'congeal[bench]'``): each is a registered pair method whose
first use says what to install when its library is missing. Every one returns the
product's matrix (:mod:`models.pairwise.methods`): ``source_from_target`` in normalised
coordinates, and a confidence in [0, 1] in its own terms (the share of RANSAC inliers, the
ECC correlation, kornia's correlation over the overlap).

OpenCV works on 8-bit grayscale: a colour image is converted with the usual luminance
weights. Inputs are ``(B, C, H, W)`` float tensors in [0, 1]; pairs are solved one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import geometry as G
from .methods import PairContext, PairEstimate, register_pair_method

__all__ = ["FeatureRansac", "ECC", "KorniaRegistrator", "MissingDependency", "ransac_confidence"]


class MissingDependency(ImportError):
    """A reference method's library is not installed; the message says what to install."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependency("this method needs OpenCV: pip install opencv-python-headless "
                                "(or pip install 'congeal[bench]')") from None
    return cv2


def _gray_u8(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` float [0, 1] -> ``(H, W)`` uint8."""
    x = x.detach().float().cpu()
    if x.shape[0] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    return np.clip(x[0].numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _estimate(ms: list[np.ndarray | None], conf: list[float], source: torch.Tensor, target: torch.Tensor,
              note: str | None = None) -> PairEstimate:
    """Pixel ``source_from_target`` matrices (``None``: failed) -> normalised, on the input's device."""
    size_s, size_t = tuple(source.shape[-2:]), tuple(target.shape[-2:])
    nan = np.full((3, 3), np.nan)
    pix = torch.tensor(np.stack([m if m is not None else nan for m in ms]), dtype=torch.float64)
    norm = G.normalised_from_pixel(pix, size_s, size_t)
    return PairEstimate(norm.to(source.device, source.dtype),
                        torch.tensor(conf, dtype=source.dtype, device=source.device),
                        notes=[note] if note else [])


def ransac_confidence(inliers: int, matches: int, min_inliers: int = 8) -> float:
    """The share of matches RANSAC kept, 0 below ``min_inliers`` (too few to trust a homography)."""
    return 0.0 if inliers < min_inliers or matches == 0 else inliers / matches


@dataclass
class FeatureRansac:
    """Keypoints and descriptors (SIFT or ORB), nearest-neighbour matches kept by Lowe's ratio test,
    a homography by RANSAC (reprojection threshold ``ransac_px`` pixels of the target)."""

    detector: str = "sift"
    ratio: float = 0.75
    ransac_px: float = 3.0
    features: int = 2000

    def __post_init__(self):
        self.name = self.detector

    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        cv2 = _cv2()
        if self.detector == "sift":
            det, norm = cv2.SIFT_create(nfeatures=self.features), cv2.NORM_L2
        else:
            det, norm = cv2.ORB_create(nfeatures=self.features), cv2.NORM_HAMMING
        matcher = cv2.BFMatcher(norm)
        mats, conf = [], []
        for b in range(source.shape[0]):
            ctx.check_stop()
            ks, ds = det.detectAndCompute(_gray_u8(source[b]), None)
            kt, dt = det.detectAndCompute(_gray_u8(target[b]), None)
            M, c = None, 0.0
            if ds is not None and dt is not None and len(ks) >= 2 and len(kt) >= 2:
                good = [m for m, *n in matcher.knnMatch(dt, ds, k=2)
                        if len(n) == 1 and m.distance < self.ratio * n[0].distance]
                if len(good) >= 4:
                    pt = np.float32([kt[m.queryIdx].pt for m in good])
                    ps = np.float32([ks[m.trainIdx].pt for m in good])
                    # From target points to source points: the product's source_from_target.
                    M, mask = cv2.findHomography(pt, ps, cv2.RANSAC, self.ransac_px)
                    if M is not None:
                        c = ransac_confidence(int(mask.sum()), len(good))
            mats.append(M)
            conf.append(c)
        return _estimate(mats, conf, source, target)


@dataclass
class ECC:
    """Enhanced correlation coefficient maximisation (Evangelidis & Psarakis 2008), homography
    motion, coarse to fine over ``levels`` pyramid levels from the identity."""

    levels: int = 3
    iterations: int = 100
    eps: float = 1e-5
    name: str = "ecc"

    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        cv2 = _cv2()
        mats, conf = [], []
        for b in range(source.shape[0]):
            ctx.check_stop()
            s, t = _gray_u8(source[b]).astype(np.float32), _gray_u8(target[b]).astype(np.float32)
            W = np.eye(3, dtype=np.float32)  # pixels of the current level, source_from_target
            rho = 0.0
            ok = True
            for lv in range(self.levels - 1, -1, -1):
                f = 2 ** lv
                sl = cv2.resize(s, (max(8, s.shape[1] // f), max(8, s.shape[0] // f)), interpolation=cv2.INTER_AREA)
                tl = cv2.resize(t, (max(8, t.shape[1] // f), max(8, t.shape[0] // f)), interpolation=cv2.INTER_AREA)
                Wl = _rescale(W, t.shape, tl.shape, s.shape, sl.shape)
                try:
                    # template = target, input = source: input(W x) ~ template(x), so W is source_from_target.
                    rho, Wl = cv2.findTransformECC(tl, sl, Wl, cv2.MOTION_HOMOGRAPHY,
                                                   (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT,
                                                    self.iterations, self.eps), None, 1)
                except cv2.error:
                    ok = False
                    break
                W = _rescale(Wl, tl.shape, t.shape, sl.shape, s.shape)
            mats.append(W.astype(np.float64) if ok else None)
            conf.append(max(0.0, float(rho)) if ok else 0.0)
        return _estimate(mats, conf, source, target)


def _rescale(W: np.ndarray, t_from, t_to, s_from, s_to) -> np.ndarray:
    """A pixel source_from_target matrix between image sizes (``(H, W)`` tuples), for pyramids."""
    St = np.diag([(t_from[1]) / t_to[1], (t_from[0]) / t_to[0], 1.0])  # target pixels: to -> from
    Ss = np.diag([s_to[1] / s_from[1], s_to[0] / s_from[0], 1.0])
    return (Ss @ W @ St).astype(np.float32)


@dataclass
class KorniaRegistrator:
    """kornia's ``ImageRegistrator`` (homography model, its defaults: Adam, L1, 5 pyramid levels,
    100 iterations a level), one pair at a time on the input's device. Colour is converted to
    grayscale when the two images' channels differ. Confidence: the correlation of the warped
    source with the target over their overlap, clipped at 0."""

    iterations: int = 100
    levels: int = 5
    lr: float = 1e-3
    name: str = "kornia"

    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        try:
            from kornia.geometry import ImageRegistrator
        except ImportError:
            raise MissingDependency("this method needs kornia: pip install kornia "
                                    "(or pip install 'congeal[bench]')") from None
        s, t = source.float(), target.float()
        if s.shape[1] != t.shape[1]:
            s, t = _gray(s), _gray(t)
        mats, conf = [], []
        Hs, Ws = s.shape[-2:]
        Ht, Wt = t.shape[-2:]
        for b in range(s.shape[0]):
            ctx.check_stop()
            reg = ImageRegistrator("homography", pyramid_levels=self.levels, num_iterations=self.iterations,
                                   lr=self.lr, allow_shape_mismatch=True).to(s.device)
            with torch.enable_grad():
                Mk = reg.register(s[b:b + 1], t[b:b + 1]).detach()  # source_from_target, kornia's normalised
            M = (_kornia_norm(Hs, Ws, Mk).inverse() @ Mk @ _kornia_norm(Ht, Wt, Mk))[0]
            mats.append(M.double().cpu().numpy())
            conf.append(overlap_correlation(source[b], target[b], M))
        return _estimate(mats, conf, source, target)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, True)


def _kornia_norm(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel -> kornia's normalised coordinates (``align_corners=False``), ``(1, 3, 3)``."""
    return torch.tensor([[[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]]],
                        dtype=like.dtype, device=like.device)


def overlap_correlation(source: torch.Tensor, target: torch.Tensor, source_from_target_pix: torch.Tensor) -> float:
    """Pearson correlation between the target and the source warped onto it, over the target pixels
    the source covers (grayscale), clipped at 0; 0 where they overlap on less than a tenth."""
    s, t = _gray(source[None].float()), _gray(target[None].float())
    M = source_from_target_pix.reshape(1, 3, 3).to(s)
    if not torch.isfinite(M).all():
        return 0.0
    size = tuple(t.shape[-2:])
    w = G.warp_pixel(s, M, size)
    inside = G.warp_pixel(torch.ones_like(s), M, size) > 0.999
    if inside.float().mean() < 0.1:
        return 0.0
    a, b = w[inside], t[inside]
    a, b = a - a.mean(), b - b.mean()
    r = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    return max(0.0, r) if math.isfinite(r) else 0.0


register_pair_method("sift")(lambda **kw: FeatureRansac(detector="sift", **kw))
register_pair_method("orb")(lambda **kw: FeatureRansac(detector="orb", **kw))
register_pair_method("ecc")(ECC)
register_pair_method("kornia")(KorniaRegistrator)
