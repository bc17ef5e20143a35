"""Synthetic small collections with known dense correspondences, for tests and ``bench/dense.py``.

One object (an elliptical cut-out of a ``skimage.data`` photograph: the *template*) is pasted into
every image through its own random warp ``template_from_image = A(tps(p))`` (a thin-plate spline
through a 4 x 4 grid of jittered control points, then an affine map: rotation, anisotropic scale,
translation), over a background that changes from image to image (a crop of another
``skimage.data`` photograph, a smooth random colour field, or a flat colour with noise), with a
small brightness/contrast change of the object. Because every image's map to the template is
known, so is every correspondence: a template point ``t`` is at ``W_i^{-1}(t)`` in image ``i``
(:func:`models.dense.warps.invert_points`).

Coordinates: normalised (``align_corners=True``) inside the code; the keypoints handed out are in
pixels (the product's convention: pixel centres at integers, origin at the top-left centre).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import warps as W

__all__ = ["OBJECTS", "WarpSpec", "DenseCollection", "template", "random_warps", "make_collection"]

# name -> (row0, row1, col0, col1): a square-ish crop holding the object, of the image as shipped.
OBJECTS = {
    "chelsea": (0, 300, 60, 360),  # the cat's head and chest
    "astronaut": (0, 300, 90, 390),  # the astronaut's head and shoulders
    "coffee": (20, 380, 120, 480),  # the cup on its saucer
    "rocket": (60, 427, 180, 547),
}
_BACKGROUNDS = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "rocket", "coffee",
                "astronaut", "chelsea", "immunohistochemistry", "hubble_deep_field")
_ELLIPSE = (0.9, 0.75)  # the cut-out's semi-axes in template coordinates (x, y)


@dataclass(frozen=True)
class WarpSpec:
    """How strong the random warps are."""

    rotation_deg: float = 25.0  # uniform in +-
    log_scale: float = 0.15  # overall scale: exp(uniform +-)
    log_aspect: float = 0.08
    translation: float = 0.15  # template units, uniform +-
    tps_sigma: float = 0.05  # control-point jitter (normalised), Gaussian
    base_scale: float = 1.4  # image [-1, 1] shows template [-1.4, 1.4]: the object fills ~60% of the image


@dataclass
class DenseCollection:
    images: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
    template_from_image: torch.Tensor  # (N, S, S, 2) normalised template coordinates of every pixel
    object_mask: torch.Tensor  # (N, S, S) float32 in [0, 1]: how much of each pixel is the object
    keypoints: torch.Tensor  # (N, K, 2) pixel coordinates of the K template keypoints in every image
    visible: torch.Tensor  # (N, K) bool: keypoint inside the image
    template: torch.Tensor  # (3, T, T) the object photograph (before the cut-out)
    name: str

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])


def _raw(name: str) -> np.ndarray:
    from ..pairwise.synthetic import raw_image

    im = np.asarray(raw_image(name))
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    im = im.astype(np.float32) / (65535.0 if im.dtype == np.uint16 else 255.0) if im.dtype != np.float32 else im
    if im.max() > 1.0:
        im = im / im.max()
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return im[..., :3]


def _resize(im: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).unsqueeze(0).float()
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def template(name: str, size: int = 128) -> torch.Tensor:
    """The object's photograph, ``(3, size, size)``."""
    if name not in OBJECTS:
        raise ValueError(f"unknown object {name!r}; choose one of {', '.join(OBJECTS)}")
    r0, r1, c0, c1 = OBJECTS[name]
    return _resize(_raw(name)[r0:r1, c0:c1], size)


def _ellipse_mask(pts: torch.Tensor, soft: float = 0.04) -> torch.Tensor:
    """Soft inside-the-cut-out weight of template points ``(..., 2) -> (...)``."""
    r = ((pts[..., 0] / _ELLIPSE[0]) ** 2 + (pts[..., 1] / _ELLIPSE[1]) ** 2).sqrt()
    return torch.sigmoid((1 - r) / soft)


def random_warps(n: int, spec: WarpSpec, gen: torch.Generator, dtype=torch.float64):
    """``n`` random ``template_from_image`` warps: ``(A (n, 2, 3), ctrl (n, 16, 2), params (n, 19, 2))``
    for :func:`models.dense.warps.warp_points`."""
    g = torch.linspace(-1, 1, 4, dtype=dtype)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    ctrl = torch.stack([gx, gy], -1).reshape(1, 16, 2).expand(n, -1, -1).contiguous()
    target = ctrl + spec.tps_sigma * torch.randn(n, 16, 2, generator=gen, dtype=dtype)
    params = W.tps_fit(ctrl, target)

    def u(lim):
        return (torch.rand(n, generator=gen, dtype=dtype) * 2 - 1) * lim

    th = u(spec.rotation_deg) * math.pi / 180
    s = spec.base_scale * torch.exp(u(spec.log_scale))
    a = torch.exp(u(spec.log_aspect))
    c, si = torch.cos(th), torch.sin(th)
    R = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)  # (n, 2, 2)
    S = torch.diag_embed(torch.stack([s * a, s / a], -1))
    t = torch.stack([u(spec.translation), u(spec.translation)], -1)
    A = torch.cat([R @ S, t.unsqueeze(-1)], dim=-1)
    return A, ctrl, params


def _background(kind: int, size: int, gen: torch.Generator, exclude: str) -> torch.Tensor:
    if kind == 0:  # a crop of another photograph
        names = [b for b in _BACKGROUNDS if b != exclude]
        im = _raw(names[int(torch.randint(len(names), (1,), generator=gen))])
        h, w = im.shape[:2]
        side = int(min(h, w) * (0.4 + 0.5 * float(torch.rand(1, generator=gen))))
        r = int(torch.randint(h - side + 1, (1,), generator=gen))
        c = int(torch.randint(w - side + 1, (1,), generator=gen))
        return _resize(im[r:r + side, c:c + side], size)
    if kind == 1:  # smooth colour field
        low = torch.rand(1, 3, 4, 4, generator=gen)
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=True)[0].clamp(0, 1)
    colour = torch.rand(3, 1, 1, generator=gen)  # flat colour with noise
    return (colour + 0.05 * torch.randn(3, size, size, generator=gen)).clamp(0, 1)


def make_collection(name: str = "chelsea", n: int = 20, size: int = 64, *, seed: int = 0, n_keypoints: int = 32,
                    spec: WarpSpec = WarpSpec()) -> DenseCollection:
    """A collection of ``n`` ``size`` x ``size`` images of object ``name`` (one of :data:`OBJECTS`)."""
    gen = torch.Generator().manual_seed(seed)
    tpl = template(name)
    # Blur a little before sampling: an image pixel covers ~2.5 template pixels.
    k = torch.tensor([0.25, 0.5, 0.25])
    tpl_blur = F.conv2d(F.pad(tpl.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])
    tpl_blur = tpl_blur.transpose(0, 1)  # (1, 3, T, T)
    A, ctrl, params = random_warps(n, spec, gen)
    tmap = W.warp_map(A, ctrl, params, size, size)  # (n, S, S, 2) float64
    obj = W.sample_map(tpl_blur.expand(n, -1, -1, -1).double(), tmap, padding_mode="border").float()
    gain = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.05 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    obj = (obj * gain + bias).clamp(0, 1)
    mask = _ellipse_mask(tmap).float()  # (n, S, S)
    kinds = torch.randint(3, (n,), generator=gen)
    bgs = torch.stack([_background(int(kd), size, gen, name) for kd in kinds])
    images = mask.unsqueeze(1) * obj + (1 - mask.unsqueeze(1)) * bgs
    # Keypoints: template points well inside the cut-out, spread by rejection sampling.
    pts = []
    while len(pts) < n_keypoints:
        p = (torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1) * torch.tensor(_ELLIPSE, dtype=torch.float64)
        if float(_ellipse_mask(p, soft=1e-3)) > 0.5 and ((p[0] / _ELLIPSE[0]) ** 2 + (p[1] / _ELLIPSE[1]) ** 2) < 0.75 ** 2:
            pts.append(p)
    tk = torch.stack(pts).unsqueeze(0).expand(n, -1, -1)  # (n, K, 2) template coordinates
    M = torch.cat([A, torch.tensor([0.0, 0.0, 1.0], dtype=A.dtype).expand(n, 1, 3)], dim=1)
    Ainv = torch.linalg.inv(M)[:, :2]
    init = W.affine_apply(Ainv, tk)
    kp = W.invert_points(lambda p: W.warp_points(A, ctrl, params, p), tk, init)
    visible = (kp.abs() <= 1).all(-1)
    return DenseCollection(images=images.clamp(0, 1).float(), template_from_image=tmap.float(), object_mask=mask,
                           keypoints=W.pixel_from_norm(kp, size, size).float(), visible=visible, template=tpl,
                           name=name)
