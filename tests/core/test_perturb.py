"""The perturbation protocol and the ground-truth measures on its pairs."""
import pytest
import torch

from models import geometry as G
from models import metrics as M
from models.evaluate import evaluate_warps
from models.perturb import make_pairs, random_perturbations


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


def _shift(tx, ty, n=1):
    return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64).expand(n, 3, 3)


def test_object_residual_against_exact_answers():
    mass = torch.rand(3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = G.offsets_to_homography(0.1 * torch.randn(3, 4, 2, dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(M.object_residual(a, a, mass), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # Copy b lands 3, 4 px away from copy a everywhere: 5 px, whatever the object.
    assert torch.allclose(M.object_residual(a, _shift(3, 4, 3) @ a, mass), torch.full((3,), 5.0, dtype=torch.float64))
    # A 2x scale about a single-pixel object's own centre moves nothing; about a point 10 px away,
    # the pixel moves 10 px one way and 5 px the other.
    one = torch.zeros(1, 28, 28, dtype=torch.float64)
    one[0, 7, 12] = 1.0
    eye = torch.eye(3, dtype=torch.float64)[None]

    def scale_about(cx, cy):
        return _shift(cx, cy) @ torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))[None] @ _shift(-cx, -cy)

    assert M.object_residual(eye, scale_about(12, 7), one).item() == pytest.approx(0.0, abs=1e-12)
    assert M.object_residual(eye, scale_about(12, 17), one).item() == pytest.approx(0.5 * (10 + 5))


def test_object_residual_does_not_change_with_a_common_frame_while_the_corner_residual_does():
    g = torch.Generator().manual_seed(2)
    src_a, src_b = random_perturbations(8, (28, 28), 0.1, g).split(4)
    w_a, w_b = random_perturbations(8, (28, 28), 0.05, g).split(4)
    mass = torch.rand(4, 28, 28, dtype=torch.float64, generator=g)
    zoom_in = torch.tensor([[0.5, 0, 6.75], [0, 0.5, 6.75], [0, 0, 1]], dtype=torch.float64).expand(4, 3, 3)
    for F in (torch.eye(3, dtype=torch.float64).expand(4, 3, 3), zoom_in, random_perturbations(4, (28, 28), 0.2, g)):
        assert torch.allclose(M.object_residual(src_a @ w_a @ F, src_b @ w_b @ F, mass),
                              M.object_residual(src_a @ w_a, src_b @ w_b, mass), rtol=1e-9)
    # The corner residual does change: a translation error is the same at every corner, but a scale
    # error about the origin is measured at corners that zooming in brings closer to it.
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    t = _shift(2, 0, 4)
    assert torch.allclose(M.pair_residual(eye, t, zoom_in, zoom_in, (28, 28)), torch.full((4,), 2.0, dtype=torch.float64))
    s = torch.diag(torch.tensor([1.1, 1.1, 1.0], dtype=torch.float64)).expand(4, 3, 3)
    assert (M.pair_residual(eye, s, zoom_in, zoom_in, (28, 28)) < M.pair_residual(eye, s, eye, eye, (28, 28))).all()


def test_evaluate_warps_scores_the_exact_inverse_as_perfect_on_both_measures():
    src = torch.zeros(6, 1, 28, 28)
    src[:, :, 8:20, 10:18] = 1.0
    pairs = make_pairs(src, 0.1, seed=3)
    exact = G.normalised_from_pixel(torch.linalg.inv(pairs.src_from_input), (28, 28), (28, 28))
    ev = evaluate_warps(pairs, exact)
    assert ev.residual_after == pytest.approx(0.0, abs=1e-6)
    assert ev.object_residual_after == pytest.approx(0.0, abs=1e-6)
    mass = src[:, 0].double()
    before = M.object_residual(pairs.src_from_input[:6], pairs.src_from_input[6:], mass)
    assert ev.object_residual_before == pytest.approx(before.mean().item(), rel=1e-9)
    assert ev.object_residual_before > 1.0
    # Identity warps score "before" on both measures.
    ev0 = evaluate_warps(pairs, torch.eye(3).expand(12, 3, 3))
    assert ev0.object_residual_ratio == pytest.approx(1.0) and ev0.residual_ratio == pytest.approx(1.0)
