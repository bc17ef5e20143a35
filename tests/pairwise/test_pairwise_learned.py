"""The learned pair method (models/pairwise/learned.py): parametrisation, keypoints, the batched
networks, batch independence, and recovery of known homographies from scratch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import geometry as G
from models.pairwise import learned as L
from models.pairwise import synthetic as S
from models.pairwise.learned import LearnedConfig, fit_pairs, homography_from_params, params_from_homography
from pairlib import chw, make_pair


def test_zero_parameters_are_the_identity_and_round_trip():
    assert torch.equal(homography_from_params(torch.zeros(3, 8)), torch.eye(3).expand(3, 3, 3))
    p = torch.randn(5, 8, dtype=torch.float64) * 0.1
    assert torch.allclose(params_from_homography(homography_from_params(p)), p, atol=1e-12)


def test_starts_begin_with_the_identity_and_are_distinct():
    M = L.start_homographies(9, 0.25, like=torch.zeros(1, dtype=torch.float64))
    assert torch.equal(M[0], torch.eye(3, dtype=torch.float64))
    # the next eight are translations by half a normalised unit (a quarter of the image) in eight directions
    t = M[1:9, :2, 2]
    assert torch.allclose(t.norm(dim=1), torch.full((8,), 0.5, dtype=torch.float64))
    assert len({tuple(np.round(m.numpy().ravel(), 6)) for m in M}) == 9


def test_pyramid_levels_halve_down_to_the_coarsest():
    assert L.pyramid_sizes((128, 128), 32, 5) == [(32, 32), (64, 64), (128, 128)]
    assert L.pyramid_sizes((100, 300), 32, 5) == [(12, 38), (25, 75), (50, 150), (100, 300)]
    assert L.pyramid_sizes((512, 512), 32, 3) == [(128, 128), (256, 256), (512, 512)]  # at most max_levels
    assert L.pyramid_sizes((40, 40), 32, 5) == [(40, 40)]


def test_keypoints_are_drawn_only_where_there_is_contrast():
    cfg = LearnedConfig()
    w = torch.zeros(2, 32 * 48)
    w.view(2, 32, 48)[:, :, 30:] = 1  # only the right part (x >= 30) may hold keypoints
    xy, theta, scale = L._keypoints(w, 500, cfg, torch.Generator().manual_seed(0), (32, 48))
    assert xy.shape == (2, 500, 2) and theta.shape == scale.shape == (2, 500)
    assert xy[..., 0].min() >= 29.5 and xy[..., 0].max() <= 47.5
    assert scale.min() >= cfg.scale[0] and scale.max() <= cfg.scale[1]
    assert theta.min() >= 0 and theta.max() < 2 * math.pi


def test_keypoint_frames_warp_exactly_under_a_similarity():
    """Eqs. 10-12 (finite differences) are exact for an affine map: the centre moves with it, the
    orientation turns by its rotation and the scale grows by its scale."""
    a, s = math.radians(30), 1.5
    M = torch.tensor([[[s * math.cos(a), -s * math.sin(a), 5.0], [s * math.sin(a), s * math.cos(a), -3.0],
                       [0.0, 0.0, 1.0]]], dtype=torch.float64)
    xy = torch.tensor([[[10.0, 20.0], [0.0, 0.0]]], dtype=torch.float64)
    theta = torch.tensor([[0.1, 2.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    c, th, sc = L._warp_frames(M, xy, theta, scale)
    assert torch.allclose(c, G.transform_points(M, xy))
    assert torch.allclose(torch.remainder(th - theta - a + math.pi, 2 * math.pi) - math.pi, torch.zeros(1, 2).double(),
                          atol=1e-9)
    assert torch.allclose(sc, scale * s)


def test_batched_networks_compute_what_each_network_computes_alone():
    cfg = LearnedConfig()
    g = torch.Generator().manual_seed(0)
    nets = L._Networks(3, 1, 3, cfg, g, like=torch.zeros(1))
    tgt, src = torch.randn(3, 7, 1, 16, 16), torch.randn(3, 7, 3, 16, 16)
    dt, ds = nets(tgt, source=False), nets(src, source=True)
    assert dt.shape == ds.shape == (3, 7, cfg.descriptor)
    assert torch.allclose(dt.norm(dim=-1), torch.ones(3, 7))
    nets.select(torch.tensor([1]))
    assert torch.allclose(nets(tgt[1:2], source=False), dt[1:2], atol=1e-5)
    assert torch.allclose(nets(src[1:2], source=True), ds[1:2], atol=1e-5)


def test_the_first_layer_is_shared_only_on_request():
    cfg = LearnedConfig(shared_first_layer=True)
    g = torch.Generator().manual_seed(0)
    nets = L._Networks(2, 1, 1, cfg, g, like=torch.zeros(1))
    x = torch.randn(2, 4, 1, 16, 16)
    assert torch.equal(nets(x, source=True), nets(x, source=False))
    with pytest.raises(ValueError, match="same number of channels"):
        L._Networks(2, 1, 3, cfg, g, like=torch.zeros(1))
    split = L._Networks(2, 1, 1, LearnedConfig(), g, like=torch.zeros(1))  # the paper's partially shared one
    assert not torch.allclose(split(x, source=True), split(x, source=False))


def test_each_pair_trains_as_if_alone():
    """The loss is a sum over pairs: what one pair sees never depends on the other pairs of its batch."""
    cfg = LearnedConfig()
    a, b, c = (make_pair(n, seed=i, patch=64) for i, n in enumerate(("astronaut", "camera", "coffee")))

    def first_pair_grad(other):
        src = torch.stack([chw(a.source), chw(other.source)])
        tgt = torch.stack([chw(a.target), chw(other.target)])
        lv = L._level(src, tgt, (64, 64), (64, 64), cfg)
        nets = L._Networks(2, 1, 1, cfg, torch.Generator().manual_seed(0), like=src)
        p = torch.zeros(2, 8, requires_grad=True)
        xy, theta, scale = L._keypoints(lv.weights[:1].expand(2, -1), 32, cfg, torch.Generator().manual_seed(1), (64, 64))
        dt, ds, valid = L._pairs(nets, lv, homography_from_params(p), xy, theta, scale, cfg)
        loss = L._contrastive(dt, ds, valid, xy, cfg)
        loss.sum().backward()
        return loss[0].item(), p.grad[0].clone(), nets.wf.grad[0].clone()

    l1, g1, w1 = first_pair_grad(b)
    l2, g2, w2 = first_pair_grad(c)
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert torch.allclose(g1, g2, atol=1e-7) and torch.allclose(w1, w2, atol=1e-7)
    assert g1.abs().sum() > 0  # the homography does get a gradient


def _errors(fit, pairs, size):
    M = G.pixel_from_normalised(fit.source_from_target_norm.double(), size, size).numpy()
    return np.array([S.corner_error(M[i], p.source_from_target, size) for i, p in enumerate(pairs)])


@pytest.mark.slow
def test_recovers_known_homographies_and_says_when_it_cannot():
    """From scratch, batched, RGB sources against grayscale targets (the partially shared network):
    a target that is the source's luminance, one with inverted intensities, and an unrelated image.
    The first two are recovered and confident; the unrelated pair scores below the method's threshold."""
    size = (96, 96)
    same = make_pair("astronaut", rho=6, seed=1, modality="channel")
    cross = make_pair("coffee", rho=6, seed=2, modality="inverted")
    a, b = make_pair("chelsea", seed=3, modality="channel"), make_pair("rocket", seed=4, modality="channel")
    src = torch.stack([chw(same.source), chw(cross.source), chw(a.source)])
    tgt = torch.stack([chw(same.target), chw(cross.target), chw(b.target)])
    # the joint fit itself, from the identity (no global search): small, seconds on a CPU
    cfg = LearnedConfig(search=False, starts=1, steps=(40, 80), coarsest=48, keypoints=32)
    fit = fit_pairs(src, tgt, cfg)
    err = _errors(fit, [same, cross], size)
    assert err[0] < 2.0 and err[1] < 2.0, err  # from about 5 px (measured 0.6-1.3 over three seeds)
    conf = fit.confidence.numpy()
    assert conf[0] > 0.4 and conf[1] > 0.4, conf  # measured 0.5-0.9
    assert conf[2] < 0.5 * L.LearnedMethod.min_confidence, conf  # measured 0.02-0.05


def test_the_confidence_is_a_known_measure():
    with pytest.raises(ValueError, match="confidence"):
        LearnedConfig(confidence="loss")
