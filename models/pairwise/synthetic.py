"""Image pairs with a known homography, for tests and ``bench/pairwise.py``.

Same-modality pairs follow DeTone et al. (2016): a ``patch x patch`` crop of a
larger image is the source; each of its four corners is moved by up to
``rho`` pixels (uniformly, independently per coordinate), and the target is the
image resampled so that the target's corners show the moved corners. The
ground truth is kept as ``source_from_target`` in patch pixels, the product's
convention (:mod:`models.geometry`): ``target(p) ~ source(M p)``. Photometric
change (gamma, blur, noise) is applied to the target only.

Cross-modal pairs keep the source in colour and replace the target by a
modality derived from it that breaks intensity matching: the gradient
magnitude, inverted intensities, a non-monotonic remap, or one colour channel.

Images come from ``skimage.data`` (shipped inside scikit-image; never downloaded).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import geometry as G

__all__ = ["NATURAL_IMAGES", "COLOUR_IMAGES", "MODALITIES", "SyntheticPair", "raw_image", "save_images", "load_image",
           "homography_pair",
           "derive_modality", "photometric", "corner_error"]

# skimage.data photographs bundled with the package (no download), grayscale or colour. Pure textures
# (brick, gravel, grass) are left out: their period is shorter than the protocol's 32 px moves, so a
# shifted copy matches as well as the true one (DeTone et al. drew from MS-COCO scenes).
NATURAL_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock", "stereo_motorcycle")
COLOUR_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
MODALITIES = ("gradient", "inverted", "remap", "channel")


@dataclass
class SyntheticPair:
    source: np.ndarray  # (P, P) or (P, P, 3) float32 in [0, 1]
    target: np.ndarray  # (P, P) or (P, P, 3) float32 in [0, 1]
    source_from_target: np.ndarray  # (3, 3) float64, patch pixels
    name: str


def raw_image(name: str) -> np.ndarray:
    """A ``skimage.data`` image as shipped (``uint8`` or ``bool``). With ``CONGEAL_SKIMAGE_NPZ`` set,
    from that file instead (``save_images``): for a machine where scikit-image cannot be installed."""
    path = os.environ.get("CONGEAL_SKIMAGE_NPZ")
    if path:
        with np.load(path, allow_pickle=False) as f:
            return f[name]
    import skimage.data

    im = getattr(skimage.data, name)()
    return np.asarray(im[0] if isinstance(im, tuple) else im)  # stereo pairs: the left view


def save_images(path: str | os.PathLike, names=NATURAL_IMAGES) -> None:
    """Write the images :func:`raw_image` reads to one ``.npz`` (for ``CONGEAL_SKIMAGE_NPZ``)."""
    np.savez_compressed(path, **{n: raw_image(n) for n in dict.fromkeys(names)})


def load_image(name: str, short_side: int = 240) -> np.ndarray:
    """A ``skimage.data`` image as float32 in [0, 1], ``(H, W)`` or ``(H, W, 3)``, resized so its
    shorter side is ``short_side`` (DeTone et al. used 320 x 240 frames)."""
    from PIL import Image

    im = raw_image(name)
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 3:
        im = im[..., :3]
    h, w = im.shape[:2]
    s = short_side / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


def _luminance(im: np.ndarray) -> np.ndarray:
    return im if im.ndim == 2 else im @ np.array([0.299, 0.587, 0.114], np.float32)


def _warp(im: np.ndarray, in_from_out: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(im if im.ndim == 3 else im[..., None]).permute(2, 0, 1)[None].double()
    out = G.warp_pixel(x, torch.from_numpy(in_from_out)[None], (size, size), padding_mode="border")
    out = out[0].permute(1, 2, 0).float().numpy()
    return out if im.ndim == 3 else out[..., 0]


def homography_pair(image: np.ndarray, rng: np.random.Generator, patch: int = 128, rho: float = 32.0,
                    name: str = "") -> SyntheticPair:
    """One DeTone-style pair from ``image`` (at least ``patch + 2 rho`` a side)."""
    h, w = image.shape[:2]
    margin = int(np.ceil(rho))
    if min(h, w) < patch + 2 * margin:
        raise ValueError(f"image {w}x{h} is too small for {patch} px patches moved by up to {rho} px")
    ox = rng.integers(margin, w - margin - patch + 1)
    oy = rng.integers(margin, h - margin - patch + 1)
    c = np.array([[0, 0], [patch - 1, 0], [patch - 1, patch - 1], [0, patch - 1]], np.float64)
    moved = c + rng.uniform(-rho, rho, size=(4, 2))
    # target(q) = image(o + moved-quad(q)): M maps the target's corners onto the moved corners.
    M = G.homography_from_points(torch.from_numpy(c)[None], torch.from_numpy(moved)[None])[0].numpy()
    T = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], np.float64)
    source = image[oy:oy + patch, ox:ox + patch].astype(np.float32)
    target = _warp(image, T @ M, patch)
    return SyntheticPair(source, np.clip(target, 0, 1), M, name)


def photometric(im: np.ndarray, rng: np.random.Generator, gamma: float = 2.0, blur: float = 1.5,
                noise: float = 0.03) -> np.ndarray:
    """Random gamma in ``[1/gamma, gamma]`` (log-uniform), Gaussian blur of sigma up to ``blur``
    pixels and Gaussian noise of sigma up to ``noise``; float [0, 1] in and out."""
    from ..imageops import blur as gblur

    g = float(np.exp(rng.uniform(-np.log(gamma), np.log(gamma))))
    out = np.clip(im, 0, 1) ** g
    s = float(rng.uniform(0, blur))
    x = torch.from_numpy(out if out.ndim == 3 else out[..., None]).permute(2, 0, 1)[None]
    out = gblur(x, s)[0].permute(1, 2, 0).numpy()
    out = out if im.ndim == 3 else out[..., 0]
    out = out + rng.normal(0, rng.uniform(0, noise), size=out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def derive_modality(im: np.ndarray, modality: str) -> np.ndarray:
    """A single-channel image of ``im``'s scene in another "modality" (float [0, 1]).

    ``gradient``: the gradient magnitude of the luminance (Sobel), scaled by its 99th percentile;
    ``inverted``: one minus the luminance; ``remap``: a non-monotonic remap of the luminance
    (``|sin(1.5 pi l)|``: bright and dark regions can map to the same value); ``channel``: the blue channel.
    """
    lum = _luminance(im)
    if modality == "gradient":
        x = torch.from_numpy(np.ascontiguousarray(lum))[None, None]
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
        p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        gx = torch.nn.functional.conv2d(p, kx[None, None])
        gy = torch.nn.functional.conv2d(p, kx.T[None, None])
        g = torch.sqrt(gx ** 2 + gy ** 2)[0, 0].numpy()
        return np.clip(g / max(float(np.percentile(g, 99)), 1e-6), 0, 1).astype(np.float32)
    if modality == "inverted":
        return (1.0 - lum).astype(np.float32)
    if modality == "remap":
        return np.abs(np.sin(1.5 * np.pi * lum)).astype(np.float32)
    if modality == "channel":
        return (im[..., 2] if im.ndim == 3 else im).astype(np.float32)
    raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")


def corner_error(estimate: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor,
                 size: tuple[int, int]) -> np.ndarray:
    """Mean corner error (MACE, px): the mean distance over the target's four corner pixels
    between where ``estimate`` and ``truth`` (``(..., 3, 3)`` source_from_target) send them.
    Returns ``(...)``; a non-finite estimate scores ``inf``."""
    est = torch.as_tensor(np.asarray(estimate, np.float64)).reshape(-1, 3, 3)
    tru = torch.as_tensor(np.asarray(truth, np.float64)).reshape(-1, 3, 3)
    c = G.corners(*size, like=tru)
    d = (G.transform_points(est, c) - G.transform_points(tru, c)).norm(dim=-1).mean(-1)
    d = torch.where(torch.isfinite(d), d, torch.full_like(d, float("inf")))
    return d.numpy().reshape(np.asarray(estimate).shape[:-2])
