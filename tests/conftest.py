"""Fixtures shared by every test directory (pytest finds them here; under the importlib import mode
a conftest cannot be imported, so shared helpers are fixtures)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test, the previous count restored after. Small convolutions
    and matrix ops on a shared 2-core runner: two OpenMP threads contend with the other processes
    and ran up to 7-10x slower than one (0.9 s against 7.2 s for one RASL fit; a dense fit's step)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def stroke_images():
    """``make(n=6, size=24, seed=0) -> [(size, size) uint8]``: dark images each holding one "L" of two
    strokes (255 and 200) at a random place, a small collection of one kind of object."""

    def make(n: int = 6, size: int = 24, seed: int = 0) -> list[np.ndarray]:
        g = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            a = np.zeros((size, size), np.uint8)
            y, x = g.integers(5, 10, 2)
            a[y:y + 10, x:x + 4] = 255
            a[y:y + 3, x:x + 10] = 200
            out.append(a)
        return out

    return make
