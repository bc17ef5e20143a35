"""Fixtures for the baseline tests: one real digit under known small warps."""
import pytest
import torch

from models import geometry as G
from models.data import mnist_digits
from models.perturb import perturb, random_perturbations


def known_warps(family: str, n: int, size: tuple[int, int], scale: float, seed: int) -> torch.Tensor:
    """``(n, 3, 3)`` pixel ``src_from_input`` inside ``family``, float64.

    Homographies follow the paper's corner protocol; the smaller families
    draw their identity-centred normalised parameters directly (scaled so the
    corners move about as much).
    """
    if family == "homography":
        return random_perturbations(n, size, scale, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    dof = G.get_family(family).dof
    p = torch.randn(n, dof, generator=g, dtype=torch.float64) * 2 * scale
    Mn = G.params_to_matrix(p, family)  # normalised src_from_input
    return G.pixel_from_normalised(Mn, size, size)


def corner_spread(src_from_input: torch.Tensor, in_from_out_norm: torch.Tensor, size) -> float:
    """Mean distance (source pixels) of the images' aligned frame corners from their mean.

    A joint alignment that recovers the warps up to one common transform
    maps every output corner to the same source point: spread 0. Frame
    corners lie far from a centred digit, so they magnify rotation, scale and
    perspective errors.
    """
    pix = G.pixel_from_normalised(in_from_out_norm.double(), size, size)
    pts = G.transform_points(src_from_input @ pix, G.corners(*size, like=pix))  # (N, 4, 2)
    return float((pts - pts.mean(0, keepdim=True)).norm(dim=-1).mean())


@pytest.fixture(scope="session")
def digit():
    """One MNIST '3', ``(1, 1, 28, 28)``."""
    return mnist_digits(3, 1)


@pytest.fixture(scope="session")
def warped_copies(digit):
    """``factory(family, n, scale, seed) -> (images (n,1,28,28), src_from_input (n,3,3))``."""

    def make(family="homography", n=12, scale=0.05, seed=0):
        W = known_warps(family, n, (28, 28), scale, seed)
        imgs = perturb(digit.double().expand(n, -1, -1, -1), W).float().clamp(0, 1)
        return imgs, W

    return make


@pytest.fixture(scope="session")
def spread():
    """:func:`corner_spread` as a fixture (conftest is not importable under importlib mode)."""
    return corner_spread


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    # The baselines run many small matrix ops (tests/conftest.py says why one thread).
    yield
