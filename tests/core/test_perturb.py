"""The perturbation protocol: per-image sizes."""
import torch

from models import geometry as G
from models.perturb import random_perturbations


def test_per_image_sigma_scales_each_draw_and_zero_is_the_identity():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    one = random_perturbations(4, (28, 28), 0.1, g())
    per = random_perturbations(4, (28, 28), torch.tensor([0.1, 0.0, 0.1, 0.05]), g())
    assert torch.allclose(per[[0, 2]], one[[0, 2]])
    assert torch.allclose(per[1], torch.eye(3, dtype=per.dtype), atol=1e-12)
    # Corner displacements are linear in sigma: half the size moves every corner half as far.
    c = G.corners(28, 28).to(per)
    d_one = G.transform_points(one[3:4], c) - c
    d_half = G.transform_points(per[3:4], c) - c
    assert torch.allclose(d_half, d_one / 2, atol=1e-9)
