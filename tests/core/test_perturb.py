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


def _undo_error(pairs):
    """Mean |undone copy - source| where the undone copy samples inside the perturbed frame."""
    size = tuple(pairs.images.shape[-2:])
    inv = torch.linalg.inv(pairs.src_from_input)
    und = G.warp_pixel(pairs.images.double(), inv, size)
    inside = G.warp_pixel(torch.ones_like(pairs.images).double(), inv, size) > 0.999
    err = (und - torch.cat([pairs.sources, pairs.sources]).double()).abs()
    return float(err[inside].mean()), float(inside.double().mean())


def test_canvas_pairs_keep_the_object_in_view_and_carry_exact_ground_truth():
    from models import metrics as M
    from models.data import mnist_digits
    from models.perturb import make_canvas_pairs, make_pairs

    src = mnist_digits(3, 32)
    p = make_canvas_pairs(src, 0.3, seed=2)
    assert p.images.shape == (64, 1, 56, 56) and p.sources.shape == (32, 1, 56, 56)
    assert torch.equal(p.sources[:, :, 14:42, 14:42], src)  # centred
    err, _ = _undo_error(p)
    assert err < 0.03
    # At sigma = 30 % the 28 px frame loses a large part of most digits; the canvas keeps most of
    # them (not all: the strongest draws are near-degenerate homographies that fold the object).
    vis_canvas = M.content_kept(torch.cat([p.sources, p.sources]).double(), p.src_from_input, (56, 56))
    q = make_pairs(src, 0.3, seed=2)
    vis_frame = M.content_kept(torch.cat([src, src]).double(), q.src_from_input, (28, 28))
    assert float(vis_canvas.median()) > 0.98 and float(vis_frame.median()) < 0.8
    assert float((vis_canvas >= 0.95).double().mean()) > 2 * float((vis_frame >= 0.95).double().mean())
    # The perturbation is the object frame's: its corner pixels move as make_pairs moves them.
    obj = q.src_from_input  # the same generator draws: same object-frame homographies
    T = torch.tensor([[1.0, 0, 14], [0, 1, 14], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(p.src_from_input, T @ obj @ torch.linalg.inv(T))


def test_photo_pairs_are_sampled_from_the_whole_photograph():
    from models.perturb import make_photo_pairs

    yy, xx = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    photo = torch.stack([0.5 + 0.4 * torch.sin(xx / 7), 0.5 + 0.4 * torch.cos(yy / 9), (xx + yy) / 700])
    p = make_photo_pairs(photo, 5, 64, 0.2, seed=1)
    assert p.images.shape == (10, 3, 64, 64) and p.sources.shape == (5, 3, 64, 64)
    assert float((p.images == 0).all(1).double().mean()) < 1e-3  # nothing filled: the frame's new content is real
    err, inside = _undo_error(p)
    assert err < 0.01 and 0.3 < inside < 0.95
