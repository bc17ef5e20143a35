"""models/semantic/geometry.py against exact answers: affine maps and grids, the TPS's defining
properties (through its control points, affine maps reproduced exactly), flows read at points."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.semantic import geometry as SG

D = torch.float64


def _rand_theta(B, g):
    return torch.eye(2, 3, dtype=D) + 0.2 * torch.randn(B, 2, 3, generator=g, dtype=D)


def test_base_grid_corners_and_pixels():
    g = SG.base_grid((3, 5), like=torch.zeros((), dtype=D))
    assert g.shape == (3, 5, 2)
    assert g[0, 0].tolist() == [-1, -1] and g[2, 4].tolist() == [1, 1]
    assert g[1, 2].tolist() == [0, 0] and g[0, 1].tolist() == [-0.5, -1]


def test_affine_points_exact():
    theta = torch.tensor([[[2.0, 0.0, 0.5], [0.0, -1.0, 0.25]]], dtype=D)
    p = torch.tensor([[[1.0, 1.0], [-0.5, 0.0]]], dtype=D)
    assert SG.affine_points(theta, p).tolist() == [[[2.5, -0.75], [-0.5, 0.25]]]


def test_affine_grid_matches_torch_align_corners_true():
    g = torch.Generator().manual_seed(0)
    theta = _rand_theta(3, g)
    ours = SG.affine_grid(theta, (7, 9))
    ref = F.affine_grid(theta, (3, 1, 7, 9), align_corners=True)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(SG.affine_grid(SG.identity_affine(2, like=theta), (4, 6)),
                          SG.base_grid((4, 6), like=theta).expand(2, -1, -1, -1))


def test_tps_kernel_values():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=D)
    U = SG.tps_kernel(a, a)
    assert U[0, 0] == 0 and U[1, 1] == 0
    assert U[0, 1].item() == pytest.approx(4 * math.log(4))


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_tps_identity_interpolation_and_affine_reproduction(grid):
    g = torch.Generator().manual_seed(grid)
    like = torch.zeros((), dtype=D)
    ctrl = SG.tps_control_points(grid, like=like)
    assert ctrl.shape == (grid * grid, 2) and ctrl[1].tolist() == [-1 + 2 / (grid - 1), -1]  # x fastest
    pts = torch.rand(2, 50, 2, generator=g, dtype=D) * 2 - 1
    # identity
    assert torch.allclose(SG.tps_points(ctrl, ctrl.expand(2, -1, -1), pts), pts, atol=1e-10)
    # through its control points, whatever they do
    dst = ctrl + 0.3 * torch.randn(2, grid * grid, 2, generator=g, dtype=D)
    assert torch.allclose(SG.tps_points(ctrl, dst, ctrl.expand(2, -1, -1)), dst, atol=1e-9)
    # an affine displacement of the control points is that affine map everywhere
    theta = _rand_theta(2, g)
    dst = SG.affine_points(theta, ctrl.expand(2, -1, -1))
    assert torch.allclose(SG.tps_points(ctrl, dst, pts), SG.affine_points(theta, pts), atol=1e-9)


def test_tps_bends_between_control_points():
    like = torch.zeros((), dtype=D)
    ctrl = SG.tps_control_points(3, like=like)
    dst = ctrl.clone()[None]
    dst[0, 4, 0] += 0.2  # the centre moves right, the border stays
    p = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [1.0, 1.0]]], dtype=D)
    q = SG.tps_points(ctrl, dst, p)
    assert q[0, 0, 0].item() == pytest.approx(0.2, abs=1e-9)
    assert 0.5 < q[0, 1, 0].item() < 0.7  # part of the shift, not all of it
    assert torch.allclose(q[0, 2], p[0, 2], atol=1e-9)
    grid = SG.tps_grid(ctrl, dst, (5, 5))
    assert torch.allclose(grid[0, 2, 2], torch.tensor([0.2, 0.0], dtype=D), atol=1e-9)


def test_tps_gradient_finite_at_control_points():
    like = torch.zeros((), dtype=D)
    ctrl = SG.tps_control_points(3, like=like)
    dst = (ctrl + 0.05)[None].clone().requires_grad_(True)
    SG.tps_points(ctrl, dst, ctrl[None]).sum().backward()
    assert torch.isfinite(dst.grad).all()


def test_pixel_normalised_round_trip_exact():
    p = torch.tensor([[0.0, 0.0], [9.0, 4.0], [4.5, 2.0]], dtype=D)
    n = SG.norm_from_pixel_points(p, (5, 10))
    assert n.tolist() == [[-1, -1], [1, 1], [0, 0]]
    assert torch.allclose(SG.pixel_from_norm_points(n, (5, 10)), p)


def test_flow_points_reads_an_affine_flow_exactly():
    g = torch.Generator().manual_seed(1)
    theta = _rand_theta(2, g)
    flow = SG.affine_grid(theta, (11, 13))
    pts = torch.rand(2, 40, 2, generator=g, dtype=D) * 2 - 1  # between pixel centres: bilinear is exact for affine
    assert torch.allclose(SG.flow_points(flow, pts), SG.affine_points(theta, pts), atol=1e-10)


def test_sample_follows_the_backward_convention():
    img = torch.zeros(1, 1, 5, 5, dtype=D)
    img[0, 0, 2, 3] = 1.0  # pixel x=3, y=2
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]], dtype=D)  # target p -> source p + 1 px in x
    out = SG.sample(img, SG.affine_grid(theta, (5, 5)))
    assert out[0, 0, 2, 2] == 1 and out.sum() == 1
