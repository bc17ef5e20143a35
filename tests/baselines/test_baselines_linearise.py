"""Linearised warping: Jacobians against finite differences (float64), and the small helpers."""
import pytest
import torch

from models import geometry as G
from models.baselines import linearise as L

FAMILIES = list(G.WARP_FAMILIES)


def _params(family, B=3, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, G.get_family(family).dof, generator=g, dtype=torch.float64) * scale


def _blob(x, y):
    """A smooth test image with two Gaussian bumps (normalised coordinates)."""
    return (torch.exp(-((x - 0.1) ** 2 / 0.1 + (y + 0.05) ** 2 / 0.2))
            + 0.5 * torch.exp(-((x + 0.3) ** 2 + (y - 0.3) ** 2) / 0.05))


@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_is_affine_in_params(family):
    # warp_basis relies on P(p) = I + sum_k p_k E_k.
    p = _params(family)
    E = L.warp_basis(family, dtype=torch.float64)
    expect = torch.eye(3, dtype=torch.float64) + torch.einsum("bk,kij->bij", p, E)
    assert torch.allclose(G.params_to_matrix(p, family), expect, atol=1e-14)


@pytest.mark.parametrize("compositional", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_point_jacobian_matches_finite_differences(family, compositional):
    p = _params(family)
    M = G.params_to_matrix(p, family)
    pts = torch.rand(9, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    J = L.point_jacobian(M, pts, family, compositional=compositional)  # (B, P, 2, dof)
    h = 1e-6
    for k in range(p.shape[1]):
        e = torch.zeros_like(p)
        e[:, k] = h
        if compositional:
            fwd, bwd = M @ G.params_to_matrix(e, family), M @ G.params_to_matrix(-e, family)
        else:
            fwd, bwd = G.params_to_matrix(p + e, family), G.params_to_matrix(p - e, family)
        fd = (G.transform_points(fwd, pts) - G.transform_points(bwd, pts)) / (2 * h)
        assert torch.allclose(J[..., k], fd, atol=1e-8), (family, k)


def _image_jacobian_error(family, size, normalise):
    """Relative error of ``linearise``'s Jacobian against central differences of the exact warp
    of a smooth analytic image (so only the image-gradient approximation is tested)."""
    grid = L.output_grid((size, size), dtype=torch.float64)
    img = _blob(grid[:, 0], grid[:, 1]).view(1, 1, size, size).expand(2, -1, -1, -1).contiguous()
    M = G.params_to_matrix(_params(family, B=2, scale=0.05, seed=2), family)
    lin = L.linearise(img, M, family, normalise=normalise)

    def exact(Mx):
        q = G.transform_points(Mx, grid)
        v = _blob(q[..., 0], q[..., 1])
        return v / v.norm(dim=1, keepdim=True) if normalise else v

    h, fd = 1e-6, []
    for k in range(G.get_family(family).dof):
        e = torch.zeros(2, G.get_family(family).dof, dtype=torch.float64)
        e[:, k] = h
        fd.append((exact(M @ G.params_to_matrix(e, family)) - exact(M @ G.params_to_matrix(-e, family))) / (2 * h))
    fd = torch.stack(fd, dim=-1)
    return float((lin.jac - fd).norm() / fd.norm())


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_image_jacobian_matches_finite_differences(family, normalise):
    coarse = _image_jacobian_error(family, 48, normalise)
    fine = _image_jacobian_error(family, 96, normalise)
    assert fine < 0.02
    # The only error left is the central-difference gradient: it must shrink
    # with resolution (a wrong or missing term would not).
    assert fine < coarse / 2


@pytest.mark.parametrize("family", ["similarity", "homography"])
def test_normalisation_jacobian_is_exact(family):
    # Along the linear model v(t) = v + t J e_k, d/dt (v/|v|) is exactly what linearise returns.
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 2, 12, 10, generator=g, dtype=torch.float64)
    M = G.params_to_matrix(_params(family, B=2, scale=0.05), family)
    raw = L.linearise(img, M, family, normalise=False)
    nrm = L.linearise(img, M, family, normalise=True)
    h = 1e-6
    for k in range(raw.jac.shape[-1]):
        vp, vm = raw.y + h * raw.jac[..., k], raw.y - h * raw.jac[..., k]
        fd = (vp / vp.norm(dim=1, keepdim=True) - vm / vm.norm(dim=1, keepdim=True)) / (2 * h)
        assert torch.allclose(nrm.jac[..., k], fd, atol=1e-8)
    assert torch.allclose(nrm.y.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_linearise_at_identity_reproduces_image():
    img = torch.rand(3, 1, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    lin = L.linearise(img, eye, "affine", normalise=False)
    assert torch.allclose(lin.y, img.flatten(1), atol=1e-12)


def test_fill_is_used_outside_the_image():
    img = torch.full((1, 1, 8, 8), 0.7, dtype=torch.float64)
    shift = G.params_to_matrix(torch.tensor([[1.5, 0.0]], dtype=torch.float64), "translation")
    out = L.warp_flat(img, shift, fill=torch.tensor([[0.7]], dtype=torch.float64))
    assert torch.allclose(out, torch.full_like(out, 0.7))


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_step_bounds_corner_motion(family):
    dp = _params(family, B=6, scale=0.5, seed=3)
    small = dp * 1e-3
    clipped = L.clip_step(dp, family, 0.1)
    c = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    move = (G.transform_points(G.params_to_matrix(clipped, family), c) - c).norm(dim=-1).amax(1)
    assert (move <= 0.1 + 1e-9).all()
    assert torch.equal(L.clip_step(small, family, 0.1), small)


@pytest.mark.parametrize("family", FAMILIES)
def test_center_warps_removes_only_the_common_transform(family):
    M = G.params_to_matrix(_params(family, B=5, scale=0.1, seed=4), family)
    Mc = L.center_warps(M, family)
    assert G.matrix_to_params(Mc, family).mean(0).abs().max() < 0.02
    # What alignment determines is unchanged: input j -> input i, M_i M_j^-1.
    rel = M[0] @ torch.linalg.inv(M[1])
    relc = Mc[0] @ torch.linalg.inv(Mc[1])
    assert torch.allclose(rel / rel[2, 2], relc / relc[2, 2], atol=1e-10)


def test_blur_keeps_mass_and_sigma_zero_is_identity():
    x = torch.rand(2, 1, 20, 20, dtype=torch.float64)
    assert torch.equal(L.gaussian_blur(x, 0.0), x)
    c = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    c[..., 10, 10] = 1
    b = L.gaussian_blur(c, 1.5)
    assert abs(float(b.sum()) - 1) < 1e-9
    assert b[..., 10, 10] < 1 and torch.allclose(b, b.flip(-1).flip(-2))
