"""Helpers for the pairwise tests: pairs of real images (``skimage.data``) with a known homography."""
from __future__ import annotations

import numpy as np
import torch

from models.pairwise import synthetic as S


def make_pair(name: str = "astronaut", rho: float = 8.0, seed: int = 0, patch: int = 96, modality: str | None = None,
              gray: bool = True) -> S.SyntheticPair:
    """One pair from ``skimage.data`` (shorter side 200 px): corners moved by up to ``rho`` px; the target
    in ``modality`` if given (the source then stays in colour)."""
    im = S.load_image(name, short_side=200)
    if gray and modality is None and im.ndim == 3:
        im = im @ np.array([0.299, 0.587, 0.114], np.float32)
    p = S.homography_pair(im, np.random.default_rng(seed), patch, rho, name)
    if modality is not None:
        p.target = S.derive_modality(p.target, modality)
    return p


def chw(a: np.ndarray) -> torch.Tensor:
    """``(H, W[, 3])`` float -> ``(C, H, W)``."""
    t = torch.from_numpy(np.array(a, np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
