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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import geometry as G

__all__ = ["random_perturbations", "perturb", "PairedSet", "make_pairs"]


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
