"""The paper's synthetic perturbation protocol and paired ground-truth sets.

Protocol (Annunziata et al. 2019, §3.1, after Lin & Lucey 2017): for an
``s x s`` image each of the four corners is moved by independent
``N(0, (sigma s)^2)`` noise per coordinate, then all four by one common
translation drawn from the same distribution. The perturbed image samples the
source at the moved corners: ``perturbed(q) = source(W q)`` with
``W = src_from_input`` mapping the perturbed image's pixels to source pixels
(``W(c_k) = c_k + n_k + t``). Content moved outside the frame is lost (filled
with 0), as in the paper.

Pairs: every source image appears twice under independent perturbations, so
an aligner's consistency is measurable with :func:`models.metrics.pair_residual`.

Two variants keep the object in view, so that a strong perturbation measures the aligner rather
than what the frame cut away: :func:`make_canvas_pairs` (the object centred on a larger empty
canvas, perturbed as the protocol perturbs the object's own frame) and :func:`make_photo_pairs`
(crops of a photograph, each perturbed view sampled from the whole photograph, so content moved
into the frame is the photograph's own and nothing is filled).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import geometry as G

__all__ = ["random_perturbations", "perturb", "PairedSet", "make_pairs", "make_canvas_pairs", "make_photo_pairs"]


def random_perturbations(n: int, size: tuple[int, int], sigma: float | torch.Tensor,
                         generator: torch.Generator | None = None,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(n, 3, 3)`` pixel homographies ``src_from_input`` drawn from the protocol.

    ``sigma`` is a fraction of the image side (0.1 for 10 %), one for all or one
    per homography ``(n,)``; for non-square images x noise scales with the width
    and y noise with the height.
    """
    H, W = size
    sig = torch.as_tensor(sigma, dtype=dtype).reshape(-1, 1, 1)  # (1 or n, 1, 1)
    scale = torch.tensor([W, H], dtype=dtype) * sig
    c = G.corners(H, W).to(dtype)
    noise = torch.randn(n, 4, 2, generator=generator, dtype=dtype) * scale
    shift = torch.randn(n, 1, 2, generator=generator, dtype=dtype) * scale
    dst = c.unsqueeze(0) + noise + shift
    return G.homography_from_points(c.unsqueeze(0).expand(n, -1, -1), dst)


def perturb(images: torch.Tensor, src_from_input: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` ``(N, C, H, W)`` through ``src_from_input`` ``(N, 3, 3)``; same shape."""
    size = tuple(images.shape[-2:])
    return G.warp_pixel(images, src_from_input.to(images.dtype), size, padding_mode="zeros")


@dataclass
class PairedSet:
    """``2N`` perturbed images: copy ``i`` and copy ``i + N`` share source ``i``."""

    images: torch.Tensor  # (2N, C, H, W)
    src_from_input: torch.Tensor  # (2N, 3, 3) float64
    n_sources: int
    sources: torch.Tensor | None = None  # (N, C, H, W): the unperturbed images, where known

    def split(self, in_from_out: torch.Tensor) -> tuple:
        """(src_a, src_b, warp_a, warp_b) for :func:`models.metrics.pair_residual`."""
        N = self.n_sources
        s = self.src_from_input
        return s[:N], s[N:], in_from_out[:N], in_from_out[N:]

    def select(self, keep: torch.Tensor) -> "PairedSet":
        """The pairs of the sources indexed by ``keep`` ``(K,)``, both copies of each, in that order."""
        idx = torch.cat([keep, self.n_sources + keep])
        src = self.sources[keep] if self.sources is not None else None
        return PairedSet(self.images[idx], self.src_from_input[idx], len(keep), src)


def make_pairs(sources: torch.Tensor, sigma: float, seed: int = 0) -> PairedSet:
    """Two independently perturbed copies of each source image ``(N, C, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    N = sources.shape[0]
    W = random_perturbations(2 * N, tuple(sources.shape[-2:]), sigma, g)
    both = torch.cat([sources, sources])
    return PairedSet(perturb(both.double(), W).float().clamp(0, 1), W, N, sources)


def make_canvas_pairs(sources: torch.Tensor, sigma: float, seed: int = 0, canvas: float = 2.0) -> PairedSet:
    """:func:`make_pairs` with each ``h x w`` source centred on a ``canvas`` times larger empty canvas.

    The perturbation is the protocol's for the *object's* frame (corner noise ``N(0, (sigma h)^2)``
    about the object's corners, whose pixels sit at ``(ox, oy)`` on the canvas), so at any sigma
    the object stays in view. Sources and ground truth are the canvas's: ``(N, C, H, W)`` with
    ``H = round(canvas h)``.
    """
    N, C, h, w = sources.shape
    H, W = round(canvas * h), round(canvas * w)
    ox, oy = (W - w) // 2, (H - h) // 2
    big = sources.new_zeros(N, C, H, W)
    big[..., oy:oy + h, ox:ox + w] = sources
    g = torch.Generator().manual_seed(seed)
    obj = random_perturbations(2 * N, (h, w), sigma, g)  # object pixels -> object pixels
    T = torch.eye(3, dtype=obj.dtype)
    T[0, 2], T[1, 2] = ox, oy  # object pixel -> canvas pixel
    Wc = T @ obj @ torch.linalg.inv(T)
    both = torch.cat([big, big])
    return PairedSet(perturb(both.double(), Wc).float().clamp(0, 1), Wc, N, big)


def make_photo_pairs(photo: torch.Tensor, n_sources: int, size: int, sigma: float, seed: int = 0,
                     centre: tuple[float, float] | None = None, jitter: float = 0.1) -> PairedSet:
    """Pairs of perturbed views of ``n_sources`` crops of one photograph ``(C, Hp, Wp)`` in [0, 1].

    Source ``i`` is a ``size x size`` crop around ``centre`` (pixels ``(x, y)``; the photograph's
    centre by default) moved by up to ``jitter`` of its side and scaled by up to ``1 +- jitter``:
    one kind of object seen a little differently each time, as in a collection of photographs.
    Each copy is the protocol's perturbation of its source's frame, sampled from the whole
    photograph (``photo(crop_i(W q))``), so the frame's new content is real and nothing is filled.
    ``src_from_input`` is ``W`` in the crop's pixels, as for :func:`make_pairs`.
    """
    C, Hp, Wp = photo.shape
    g = torch.Generator().manual_seed(seed)
    cx, cy = centre if centre is not None else ((Wp - 1) / 2, (Hp - 1) / 2)
    u = torch.rand(n_sources, 3, generator=g, dtype=torch.float64) * 2 - 1
    scale = 1 + jitter * u[:, 0]  # photo pixels per crop pixel
    crop = torch.zeros(n_sources, 3, 3, dtype=torch.float64)  # crop pixel -> photo pixel
    crop[:, 0, 0] = crop[:, 1, 1] = scale
    crop[:, 0, 2] = cx + jitter * size * u[:, 1] - scale * (size - 1) / 2
    crop[:, 1, 2] = cy + jitter * size * u[:, 2] - scale * (size - 1) / 2
    crop[:, 2, 2] = 1
    Wq = random_perturbations(2 * n_sources, (size, size), sigma, g)
    ph = photo.double()[None].expand(2 * n_sources, C, Hp, Wp)
    crops = torch.cat([crop, crop])
    views = G.warp_pixel(ph, crops @ Wq, (size, size), padding_mode="zeros")
    sources = G.warp_pixel(ph[:n_sources], crop, (size, size), padding_mode="zeros")
    return PairedSet(views.float().clamp(0, 1), Wq, n_sources, sources.float().clamp(0, 1))
