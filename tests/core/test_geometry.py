"""Geometry against exact answers, round trips and float64 gradcheck."""
import math

import pytest
import torch

from models import geometry as G

FAMILIES = list(G.WARP_FAMILIES)


def _rand_params(family, B=5, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, G.get_family(family).dof, generator=g, dtype=torch.float64) - 0.5) * 2 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_params_are_identity(family):
    p = torch.zeros(3, G.get_family(family).dof, dtype=torch.float64)
    assert torch.equal(G.params_to_matrix(p, family), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))


@pytest.mark.parametrize("family", FAMILIES)
def test_params_matrix_round_trip(family):
    p = _rand_params(family)
    assert torch.allclose(G.matrix_to_params(G.params_to_matrix(p, family), family), p, atol=1e-12)


def test_similarity_is_rotation_and_scale():
    s, t = 1.3, 0.4
    p = torch.tensor([[s * math.cos(t) - 1, s * math.sin(t), 0.2, -0.1]], dtype=torch.float64)
    M = G.params_to_matrix(p, "similarity")[0]
    expect = torch.tensor([[s * math.cos(t), -s * math.sin(t), 0.2], [s * math.sin(t), s * math.cos(t), -0.1],
                           [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(M, expect, atol=1e-12)


def test_matrix_to_params_projects_onto_smaller_family():
    A = G.params_to_matrix(torch.tensor([[0.1, 0.05, 0.3, -0.05, 0.1, -0.2]], dtype=torch.float64), "affine")
    t = G.matrix_to_params(A, "translation")
    assert torch.allclose(t, torch.tensor([[0.3, -0.2]], dtype=torch.float64))
    s = G.matrix_to_params(A, "similarity")  # a = mean diag - 1, b = antisymmetric part
    assert torch.allclose(s, torch.tensor([[0.1, -0.05, 0.3, -0.2]], dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_compose_with_inverse_is_identity(family):
    Mx = G.params_to_matrix(_rand_params(family, scale=0.2), family)
    eye = torch.eye(3, dtype=torch.float64).expand_as(Mx)
    assert torch.allclose(G.compose(Mx, G.invert(Mx)), eye, atol=1e-12)
    assert torch.allclose(G.compose(G.invert(Mx), Mx), eye, atol=1e-12)


def test_normaliser_maps_corner_pixel_centres_to_unit_square():
    N = G.normaliser(5, 9, dtype=torch.float64)
    pts = torch.tensor([[0.0, 0.0], [8.0, 4.0], [4.0, 2.0]], dtype=torch.float64)
    out = G.transform_points(N[None], pts)[0]
    assert torch.allclose(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_pixel_normalised_round_trip_and_identity_between_sizes():
    Mn = G.params_to_matrix(_rand_params("homography", scale=0.1), "homography")
    P = G.pixel_from_normalised(Mn, (20, 30), (10, 12))
    assert torch.allclose(G.normalised_from_pixel(P, (20, 30), (10, 12)), Mn, atol=1e-12)
    # The normalised identity between different sizes is a pure pixel scaling of corners.
    I = torch.eye(3, dtype=torch.float64)[None]
    P = G.pixel_from_normalised(I, (21, 31), (11, 16))
    c = G.transform_points(P, G.corners(11, 16, like=P))[0]
    assert torch.allclose(c, G.corners(21, 31, like=P), atol=1e-12)


def test_homography_from_points_exact():
    H = torch.tensor([[[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0], [0.001, -0.002, 1.0]]], dtype=torch.float64)
    src = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [10.0, 8.0], [0.0, 8.0]]], dtype=torch.float64)
    dst = G.transform_points(H, src)
    assert torch.allclose(G.homography_from_points(src, dst), H, atol=1e-10)


def test_warp_integer_translation_is_exact_shift():
    x = torch.arange(7 * 9, dtype=torch.float64).view(1, 1, 7, 9)
    # Backward map: output (x, y) samples input (x + 2, y + 1).
    T = torch.tensor([[[1.0, 0, 2], [0, 1, 1], [0, 0, 1]]], dtype=torch.float64)
    y = G.warp_pixel(x, T, (7, 9))
    assert torch.allclose(y[..., :6, :7], x[..., 1:, 2:], atol=1e-9)
    assert y[..., 6:, :].abs().max() < 1e-9  # outside -> 0
    assert y[..., :, 7:].abs().max() < 1e-9


def test_warp_identity_and_transpose_like_flip():
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    assert torch.allclose(G.warp(x, eye, (6, 6)), x, atol=1e-12)
    flip = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64).expand(2, 3, 3)
    assert torch.allclose(G.warp(x, flip, (6, 6)), x.flip(-1), atol=1e-12)


def test_warp_samples_bilinearly_at_mapped_points():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 12, 14, generator=g, dtype=torch.float64)
    H = torch.tensor([[[0.9, 0.1, 1.5], [-0.05, 1.05, 0.7], [0.002, 0.001, 1.0]]], dtype=torch.float64)
    y = G.warp_pixel(x, H, (8, 10))
    pts = torch.tensor([[3.0, 2.0], [7.0, 5.0], [0.0, 0.0]], dtype=torch.float64)
    q = G.transform_points(H, pts)[0]
    for (u, v), (qx, qy) in zip(pts.long().tolist(), q.tolist()):
        x0, y0 = math.floor(qx), math.floor(qy)
        ax, ay = qx - x0, qy - y0
        im = x[0, 0]
        expect = ((1 - ax) * (1 - ay) * im[y0, x0] + ax * (1 - ay) * im[y0, x0 + 1]
                  + (1 - ax) * ay * im[y0 + 1, x0] + ax * ay * im[y0 + 1, x0 + 1])
        assert abs(y[0, 0, v, u].item() - expect.item()) < 1e-10


def test_jacobian_determinant_of_scaling_and_homography():
    S = torch.tensor([[[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1]]], dtype=torch.float64)
    assert torch.allclose(G.jacobian_determinant(S, (4, 5)), torch.full((1, 4, 5), 6.0, dtype=torch.float64))
    H = torch.tensor([[[1.0, 0.1, 2.0], [0.2, 0.9, 1.0], [0.01, 0.02, 1.0]]], dtype=torch.float64)
    x, y, eps = 3.0, 2.0, 1e-6
    f = lambda px, py: G.transform_points(H, torch.tensor([[px, py]], dtype=torch.float64))[0, 0]  # noqa: E731
    J = torch.stack([(f(x + eps, y) - f(x - eps, y)) / (2 * eps), (f(x, y + eps) - f(x, y - eps)) / (2 * eps)], 1)
    assert abs(G.jacobian_determinant(H, (4, 5))[0, 2, 3].item() - torch.linalg.det(J).abs().item()) < 1e-6
    # At arbitrary (non-grid) points, the same finite-difference answer.
    x, y = 1.7, -2.3
    J = torch.stack([(f(x + eps, y) - f(x - eps, y)) / (2 * eps), (f(x, y + eps) - f(x, y - eps)) / (2 * eps)], 1)
    at = G.jacobian_determinant_at(H, torch.tensor([[[x, y]]], dtype=torch.float64))
    assert at.shape == (1, 1) and abs(at.item() - torch.linalg.det(J).abs().item()) < 1e-6


def test_det3_matches_linalg_det_on_batched_matrices():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(7, 2, 3, 3, dtype=torch.float64, generator=g)
    assert G.det3(M).shape == (7, 2)
    assert torch.allclose(G.det3(M), torch.linalg.det(M), atol=1e-12)
    assert G.det3(torch.eye(3)).item() == 1.0
    assert G.det3(torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])).item() == 0.0  # singular, exactly


def test_warp_fills_outside_with_the_given_background():
    img = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    shift = G.normalised_from_pixel(torch.tensor([[[1.0, 0, 10], [0, 1.0, 0], [0, 0, 1]]], dtype=torch.float64)
                                    .expand(2, 3, 3), (4, 4), (4, 4))  # samples 10 px to the right: all outside
    fill = torch.tensor([0.2, 0.9], dtype=torch.float64).view(2, 1, 1, 1)
    out = G.warp(img, shift, (4, 4), fill=fill)
    assert torch.allclose(out, fill.expand(2, 1, 4, 4))
    assert torch.equal(G.warp(img, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), (4, 4), fill=fill), img)


def test_warp_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64)
    p = (torch.rand(2, 8, generator=g, dtype=torch.float64) - 0.5) * 0.1
    p.requires_grad_(True)
    f = lambda q: G.warp(x, G.params_to_matrix(q, "homography"), (4, 5))  # noqa: E731
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-5)


def test_dtype_and_device_follow_input():
    for dt in (torch.float32, torch.float64):
        p = torch.zeros(2, 6, dtype=dt)
        M = G.params_to_matrix(p, "affine")
        assert M.dtype == dt
        assert G.normaliser(4, 4, like=M).dtype == dt
        assert G.warp(torch.rand(2, 1, 4, 4, dtype=dt), M, (3, 3)).dtype == dt


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown warp family 'rigidish'"):
        G.get_family("rigidish")


def test_corner_offsets_round_trip_and_identity():
    z = torch.zeros(2, 8, dtype=torch.float64)
    assert torch.allclose(G.offsets_to_homography(z), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    d = (torch.rand(3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5) * 0.4
    assert torch.allclose(G.homography_to_offsets(G.offsets_to_homography(d)), d, atol=1e-10)
    H = G.offsets_to_homography(d)
    c = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(G.transform_points(H, c), c + d.view(3, 4, 2), atol=1e-10)


@pytest.mark.parametrize("family", ["translation", "similarity", "affine", "homography"])
def test_projected_corner_offsets_give_a_matrix_of_the_family(family):
    """The curriculum's projection: exact in the family, idempotent, the least-squares fit of the
    corners (orthogonal: the residual is orthogonal to every offset the family can make), and the
    same by name and by rank tensor."""
    g = torch.Generator().manual_seed(3)
    d = 0.2 * torch.randn(6, 8, dtype=torch.float64, generator=g)
    q = G.project_offsets(d, family)
    M = G.offsets_to_homography(q)
    assert torch.allclose(G.params_to_matrix(G.matrix_to_params(M, family), family), M, atol=1e-12)
    assert torch.allclose(G.project_offsets(q, family), q, atol=1e-12)
    assert torch.equal(G.project_offsets(d, torch.tensor(G.get_family(family).rank)), q)
    inside = G.homography_to_offsets(G.params_to_matrix(0.1 * torch.randn(4, G.get_family(family).dof,
                                                                           dtype=torch.float64, generator=g), family))
    assert torch.allclose(((d - q)[:, None, :] * inside[None]).sum(-1), torch.zeros(6, 4, dtype=torch.float64),
                          atol=1e-12)
    if family == "translation":
        assert torch.allclose(q.view(-1, 4, 2), d.view(-1, 4, 2).mean(1, keepdim=True).expand(-1, 4, 2))
    if family == "homography":
        assert torch.equal(q, d)


def test_square_to_quad_is_the_four_point_homography():
    """The closed form equals the DLT solve on random quadrilaterals (perspective ones included),
    and maps each frame corner onto its quadrilateral corner."""
    g = torch.Generator().manual_seed(5)
    quad = G.unit_corners(like=torch.zeros(1, dtype=torch.float64)) + 0.35 * torch.randn(64, 4, 2, dtype=torch.float64,
                                                                                            generator=g)
    H = G.square_to_quad(quad)
    src = G.unit_corners(like=quad).expand(64, 4, 2)
    assert torch.allclose(H, G.homography_from_points(src, quad), atol=1e-9)
    assert torch.allclose(G.transform_points(H, src), quad, atol=1e-12)
    assert torch.allclose(H[:, 2, 2], torch.ones(64, dtype=torch.float64))
