"""The convex pieces against exact answers: singular value shrinkage, the RASL
inner problem, the robust subspace step and the Grassmann geodesic."""
import math

import pytest
import torch

from models import geometry as G
from models.baselines import _common as C
from models.baselines import linearise as L
from models.baselines.rasl import rasl_inner, shrink_singular_values
from models.baselines.tgrasta import geodesic_step


def _svd_shrink(X, tau, keep):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    S2 = (S - tau).clamp_min(0)
    S2[:keep] = S[:keep]
    return (U * S2) @ Vh, S2


@pytest.mark.parametrize("shape", [(7, 30), (30, 7)])  # both Gram sides
@pytest.mark.parametrize("keep", [0, 2])
def test_shrinkage_matches_thin_svd(shape, keep):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tau = float(torch.linalg.svdvals(X)[3])  # some values cut, some kept
    got, s = shrink_singular_values(X, tau, keep)
    want, s_want = _svd_shrink(X, tau, keep)
    assert torch.allclose(got, want, atol=1e-9)
    assert torch.allclose(s, s_want, atol=1e-9)


def test_inner_problem_splits_low_rank_and_sparse():
    # Robust PCA without motion (J = 0): a rank-1 matrix plus a few large
    # spikes is recovered exactly (Candes et al.'s regime).
    g = torch.Generator().manual_seed(0)
    N, m = 40, 200
    A0 = torch.randn(N, 1, generator=g, dtype=torch.float64) @ torch.randn(1, m, generator=g, dtype=torch.float64)
    E0 = torch.zeros(N, m, dtype=torch.float64)
    idx = torch.randperm(N * m, generator=g)[: N * m // 50]
    E0.view(-1)[idx] = 10 * torch.randn(idx.numel(), generator=g, dtype=torch.float64)
    res = rasl_inner(A0 + E0, torch.zeros(N, m, 1, dtype=torch.float64), 1 / math.sqrt(m), max_iters=500, tol=1e-9)
    assert torch.allclose(res.A, A0, atol=1e-4 * A0.abs().max())
    assert torch.allclose(res.E, E0, atol=1e-4 * A0.abs().max())


def test_inner_problem_recovers_a_known_motion():
    # D = A0 - J dp0 with A0 rank 1 and no outliers: the solver must put the
    # motion back (dp = dp0), since any other dp leaves a higher-rank A.
    g = torch.Generator().manual_seed(1)
    N, m, dof = 12, 80, 2
    A0 = torch.ones(N, 1, dtype=torch.float64) @ torch.randn(1, m, generator=g, dtype=torch.float64)
    J = torch.randn(N, m, dof, generator=g, dtype=torch.float64)
    dp0 = 0.1 * torch.randn(N, dof, generator=g, dtype=torch.float64)
    dp0 -= dp0.mean(0)  # the common motion is not identifiable against a shared J component
    D = A0 - torch.einsum("bmk,bk->bm", J, dp0)
    res = rasl_inner(D, J, 1 / math.sqrt(m), max_iters=500, tol=1e-10)
    assert torch.allclose(res.dp, dp0, atol=1e-3)


def test_robust_subspace_step_recovers_a_shift_despite_occlusion():
    # An image of the subspace shifted by a known translation, with a block
    # occluder: the L1 step must undo the shift (least squares is pulled off).
    H = W = 40
    grid = L.output_grid((H, W), dtype=torch.float64)
    blob = torch.exp(-(grid[:, 0] ** 2 + 0.7 * grid[:, 1] ** 2) / 0.15).view(1, 1, H, W)
    U = (blob.flatten() / blob.norm()).view(-1, 1)
    shift = torch.tensor([[0.03, -0.02]], dtype=torch.float64)
    # input(q) = blob(q - shift): the warp M = T(shift) brings it back exactly.
    moved = L.warp_flat(blob, G.params_to_matrix(-shift, "translation")).view(1, 1, H, W)
    moved[..., 8:16, 8:16] = 0.8
    lin = L.linearise(moved, torch.eye(3, dtype=torch.float64)[None], "translation", normalise=True)
    st = C.robust_subspace_step(lin.y, lin.jac, U, iters=60)
    assert torch.allclose(st.dp, shift, atol=1e-3)
    assert float(st.residual.max()) < 1e-4
    lsq = torch.linalg.lstsq(torch.cat([lin.jac[0], -U], 1), -lin.y[0:1].T).solution[:2, 0]
    assert not torch.allclose(lsq, shift[0], atol=1e-2)


def test_geodesic_step_turns_by_the_requested_angle():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))
    D = torch.randn(30, 3, generator=g, dtype=torch.float64)
    D = D - U @ (U.T @ D)  # tangent
    Un = geodesic_step(U, D, 0.2)
    assert torch.allclose(Un.T @ Un, torch.eye(3, dtype=torch.float64), atol=1e-12)
    angles = torch.arccos(torch.linalg.svdvals(U.T @ Un).clamp(max=1.0))
    assert abs(float(angles.max()) - 0.2) < 1e-9
    # A zero direction leaves U where it is.
    assert torch.equal(geodesic_step(U, torch.zeros_like(D), 0.2), U)
