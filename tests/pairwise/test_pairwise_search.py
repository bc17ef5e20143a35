"""The global search that starts the learned pair method (models/pairwise/search.py): exact answers of
its geometry pieces, invariances of its features, and recovery of known large homographies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import geometry as G
from models.pairwise import search as Q
from models.pairwise import synthetic as S
from pairlib import chw, make_pair


def _random_homographies(n: int, gen: torch.Generator, amount: float = 0.2) -> torch.Tensor:
    """``(n, 3, 3)`` normalised homographies: the unit square's corners moved by up to ``amount``."""
    d = (torch.rand(n, 8, generator=gen, dtype=torch.float64) * 2 - 1) * amount
    return G.offsets_to_homography(d)


def test_similarity_homographies_turn_and_scale_about_the_centres():
    a, s = torch.tensor([math.radians(30.0), 0.0], dtype=torch.float64), torch.tensor([1.5, 0.8], dtype=torch.float64)
    M = Q.similarity_homographies(a, s, (40, 60), (20, 30))  # source 60 x 40, target 30 x 20
    ct, cs = torch.tensor([[14.5, 9.5]], dtype=torch.float64), torch.tensor([29.5, 19.5], dtype=torch.float64)
    assert torch.allclose(G.transform_points(M, ct), cs.expand(2, 1, 2))
    v = G.transform_points(M, ct + torch.tensor([[1.0, 0.0]], dtype=torch.float64)) - cs
    assert torch.allclose(v[0, 0], 1.5 * torch.tensor([math.cos(a[0]), math.sin(a[0])], dtype=torch.float64))
    assert torch.allclose(v[1, 0], torch.tensor([0.8, 0.0], dtype=torch.float64))


def test_fit_homography_is_exact_and_ignores_zero_weights():
    g = torch.Generator().manual_seed(0)
    H = _random_homographies(3, g)
    src = torch.rand(3, 12, 2, generator=g, dtype=torch.float64) * 2 - 1
    dst = G.transform_points(H, src)
    assert torch.allclose(Q.fit_homography(src[:, :4], dst[:, :4]), H, atol=1e-9)  # four points: the DLT
    bad = dst.clone()
    bad[:, 5:] += 0.5  # gross outliers, weighted out
    w = torch.ones(3, 12, dtype=torch.float64)
    w[:, 5:] = 0
    assert torch.allclose(Q.fit_homography(src, bad, w), H, atol=1e-9)


def test_ransac_finds_the_homography_among_outliers():
    g = torch.Generator().manual_seed(1)
    H = _random_homographies(4, g)
    src = torch.rand(4, 30, 2, generator=g, dtype=torch.float64) * 2 - 1
    dst = G.transform_points(H, src) + 1e-4 * torch.randn(4, 30, 2, generator=g, dtype=torch.float64)
    out = torch.rand(4, 30, generator=g) < 0.35  # about a third: random points
    dst = torch.where(out[..., None], torch.rand(4, 30, 2, generator=g, dtype=torch.float64) * 2 - 1, dst)
    Hr, inl = Q.ransac_homography(src, dst, torch.ones(4, 30, dtype=torch.float64), 0.01, generator=g)
    assert Q.corner_distance(Hr, H).max() < 1e-3
    far = (G.transform_points(H, src) - dst).norm(dim=-1) > 0.02
    assert torch.equal(inl & far, torch.zeros_like(inl))  # no far point is an inlier
    assert (inl | far).all()  # and every close one is


def test_translation_ncc_peaks_at_the_shift_with_score_one():
    g = torch.Generator().manual_seed(2)
    pad, H, W = 5, 20, 24
    canvas = torch.randn(1, 3, H + 2 * pad, W + 2 * pad, generator=g, dtype=torch.float64)
    tx, ty = 3, -2
    # target pixel p shows the canvas at p + pad + (tx, ty)
    ft = canvas[..., pad + ty:pad + ty + H, pad + tx:pad + tx + W].clone()
    score = Q.translation_ncc(ft, torch.ones(1, 1, H, W, dtype=torch.float64), canvas,
                              torch.ones(1, 1, H + 2 * pad, W + 2 * pad, dtype=torch.float64), pad, 0.1)
    assert score.shape == (1, 2 * pad + 1, 2 * pad + 1)
    i = int(score[0].argmax())
    assert (i // (2 * pad + 1) - pad, i % (2 * pad + 1) - pad) == (ty, tx)
    assert score[0].max().item() == pytest.approx(1.0, abs=1e-9)


def test_translation_ncc_broadcasts_one_target_against_many_canvases():
    """A target ``(P, 1, C, H, W)`` against ``(P, K, C, ...)`` canvases scores as the target repeated
    K times; with masks that are not all ones (the overlap, the normalisation)."""
    g = torch.Generator().manual_seed(3)
    pad, H, W = 4, 12, 10
    ft = torch.randn(2, 1, 3, H, W, generator=g, dtype=torch.float64)
    mt = (torch.rand(2, 1, 1, H, W, generator=g, dtype=torch.float64) > 0.2).double()
    fw = torch.randn(2, 5, 3, H + 2 * pad, W + 2 * pad, generator=g, dtype=torch.float64)
    mw = (torch.rand(2, 5, 1, H + 2 * pad, W + 2 * pad, generator=g, dtype=torch.float64) > 0.3).double()
    mw[..., : W // 2 + pad] = 0  # the canvas's left part is invalid: the overlap depends on the shift
    once = Q.translation_ncc(ft, mt, fw, mw, pad, 0.3, 1.0)
    assert once.shape == (2, 5, 2 * pad + 1, 2 * pad + 1)
    rep = Q.translation_ncc(ft.expand(-1, 5, -1, -1, -1).flatten(0, 1), mt.expand(-1, 5, -1, -1, -1).flatten(0, 1),
                            fw.flatten(0, 1), mw.flatten(0, 1), pad, 0.3, 1.0)
    assert torch.allclose(once.flatten(0, 1), rep, atol=1e-12)
    assert (once == -1).any() and (once > -1).any()  # some shifts below the overlap, some above


def test_masked_features_need_no_second_mask():
    """The features of a 0/1 mask (orientation_features, orientation_field) are 0 outside it: their
    correlation stack is the same without multiplying by the mask again."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 30, 34, generator=g)
    mask = Q._erode((torch.rand(2, 1, 30, 34, generator=g) > 0.05).float())
    for f in (Q.orientation_features(x, mask=mask), Q.orientation_field(x, mask)):
        assert torch.equal(Q._ncc_stack(f, mask, masked=True), Q._ncc_stack(f, mask))


@pytest.mark.parametrize("sigma", [0.5, 0.7, 1.5, 3.0])
def test_blur_by_matrices_is_the_convolution_blur(sigma):
    from models.imageops import blur

    x = torch.randn(3, 2, 17, 23, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(Q._blur(x, sigma), blur(x, sigma), atol=1e-12)
    assert torch.equal(Q._blur(x, 0.0), x)


def test_erode_by_matrices_is_min_pooling():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    for r in (1, 2):
        mask = (torch.rand(2, 1, 19, 26, generator=g) > 0.1).float()
        mask[1, :, 3:, 4:] = 1  # a large block of ones: erosion leaves some of it
        want = -F.max_pool2d(-mask, 2 * r + 1, 1, r)
        assert torch.equal(Q._erode(mask, r), want)
        assert want.sum() > 0


def test_peak_is_exact_for_a_parabola():
    y, x = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    score = 5 - (x - 4.3).square() - 2 * (y - 6.8).square()
    xy, val = Q._peak(score[None].double())
    assert torch.allclose(xy[0], torch.tensor([4.3, 6.8], dtype=torch.float64), atol=1e-9)
    assert val.item() == pytest.approx(float(score.max()))


def test_orientation_features_ignore_inversion_and_turn_with_the_image():
    im = torch.from_numpy(make_pair("camera", rho=0, patch=48).source.copy()).double()[None, None]
    f = Q.orientation_features(im, bins=8)
    assert f.shape == (1, 8, 48, 48)
    # unsigned orientation and a contrast-normalised vote: inverting the intensities changes nothing
    assert torch.allclose(Q.orientation_features(1 - im, bins=8), f, atol=1e-9)
    # a quarter turn of the image turns every orientation by 90 degrees: half of the 8 bins over [0, pi)
    r = Q.orientation_features(torch.rot90(im, 1, (-2, -1)), bins=8)
    assert torch.allclose(r, torch.rot90(f, 1, (-2, -1)).roll(4, 1), atol=1e-9)


def test_corner_distance_of_a_translation():
    A = torch.eye(3, dtype=torch.float64)[None]
    B = A.clone()
    B[0, 0, 2] = 0.3
    assert Q.corner_distance(A, A).item() == 0.0
    assert Q.corner_distance(A, B).item() == pytest.approx(0.3)


def _corner_errors(M_norm, pairs, size):
    M = G.pixel_from_normalised(M_norm.double(), size, size).numpy()
    return np.array([S.corner_error(M[i], p.source_from_target, size) for i, p in enumerate(pairs)])


def test_global_search_recovers_large_homographies_within_and_across_modalities():
    """Corners moved by up to a quarter of the image (DeTone's +-32 px on 128 px, here 96 px and
    +-24 px), far outside the learned fit's basin: the search alone lands within a pixel or two, for a
    grayscale target and for an inverted one against a colour source."""
    pairs = [make_pair("astronaut", rho=24, seed=5), make_pair("coffee", rho=24, seed=6, modality="inverted")]
    src = [chw(p.source) for p in pairs]
    src[0] = src[0].expand(3, -1, -1)  # one batch: both sources in colour
    M, score = Q.global_search(torch.stack(src), torch.stack([chw(p.target) for p in pairs]),
                               generator=torch.Generator().manual_seed(0))
    assert M.shape == (2, Q.SearchConfig().keep, 3, 3) and (score[:, :-1] >= score[:, 1:]).all()
    start = np.array([S.corner_error(np.eye(3), p.source_from_target, (96, 96)) for p in pairs])
    err = _corner_errors(M[:, 0], pairs, (96, 96))
    assert (start > 12).all(), start  # the identity is far off
    assert (err < 2.0).all(), err  # measured 0.3-0.6 px


def test_the_learned_fit_starts_from_the_search():
    """fit_pairs with the search (the default): a +-24 px pair lands within 2 px; with
    ``search_joint=False`` the homography is the search's (the network trains on the pair for its
    retrieval share only), and by default (``search_joint``) the learned loss moves it from there."""
    from models.pairwise.learned import LearnedConfig, fit_pairs

    p = make_pair("astronaut", rho=24, seed=5)
    src, tgt = chw(p.source)[None], chw(p.target)[None]
    cfg = LearnedConfig(search_steps=(8,), keypoints=16, eval_keypoints=64, search_refine=False, search_joint=False)
    fit = fit_pairs(src, tgt, cfg)
    start = torch.tensor(fit.history[0]["search_starts"])[:, 0]
    assert torch.equal(fit.source_from_target_norm, start.to(fit.source_from_target_norm.dtype))
    assert _corner_errors(fit.source_from_target_norm, [p], (96, 96))[0] < 2.0
    # with the refinement (the default), the homography is the refined search start
    refined = fit_pairs(src, tgt, LearnedConfig(search_steps=(8,), keypoints=16, eval_keypoints=64, search_joint=False))
    assert torch.equal(refined.source_from_target_norm,
                       torch.tensor(refined.history[1]["refined"])[:, 0].to(refined.source_from_target_norm.dtype))
    assert _corner_errors(refined.source_from_target_norm, [p], (96, 96))[0] < 0.5
    assert LearnedConfig().search_joint  # the default: the paper's joint fit after the search
    joint = fit_pairs(src, tgt, LearnedConfig(search_steps=(8,), keypoints=16, eval_keypoints=64, warmup=2))
    moved = Q.corner_distance(joint.source_from_target_norm, start.to(joint.source_from_target_norm.dtype))
    assert 0 < moved.item() < 0.05  # it moved, by less than 2.4 px of this image


def test_a_pairs_search_does_not_depend_on_its_batch():
    a, b = make_pair("camera", rho=20, seed=7, patch=64), make_pair("coffee", rho=20, seed=8, patch=64)

    def search(pairs):
        src = torch.stack([chw(p.source) for p in pairs])
        tgt = torch.stack([chw(p.target) for p in pairs])
        return Q.global_search(src, tgt, generator=torch.Generator().manual_seed(0))[0]

    alone, batched = search([a]), search([b, a])  # second in its batch: after another pair's draws
    assert Q.corner_distance(alone[0], batched[1]).max() < 1e-4


def test_global_search_asks_whether_to_stop_before_each_pair_and_round():
    pairs = [make_pair(n, rho=20, seed=s, patch=64) for n, s in (("camera", 7), ("coffee", 8), ("astronaut", 9))]
    src = torch.stack([chw(p.source) for p in pairs])
    tgt = torch.stack([chw(p.target) for p in pairs])
    calls = []

    class Stop(Exception):
        pass

    def stop_at_second_pair():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        Q.global_search(src, tgt, generator=torch.Generator().manual_seed(0), should_stop=stop_at_second_pair)
    calls.clear()
    Q.global_search(src, tgt, generator=torch.Generator().manual_seed(0), should_stop=lambda: calls.append(1))
    assert len(calls) == len(pairs) + len(Q.SearchConfig().rounds)


def test_match_refine_with_candidates_per_pair_is_the_pairs_repeated():
    """K candidates of a pair share its target's features: the answer is that of the pair repeated K times."""
    pairs = [make_pair("camera", rho=12, seed=5, patch=64), make_pair("coffee", rho=12, seed=6, patch=64)]
    src = torch.stack([chw(p.source) for p in pairs])
    tgt = torch.stack([chw(p.target) for p in pairs])
    M = _random_homographies(6, torch.Generator().manual_seed(1), 0.05).float()  # 3 candidates a pair
    shared, inl = Q.match_refine(src, tgt, M, 64, 4, 24, 8, generator=torch.Generator().manual_seed(0))
    rep, inl_rep = Q.match_refine(src.repeat_interleave(3, 0), tgt.repeat_interleave(3, 0), M, 64, 4, 24, 8,
                                  generator=torch.Generator().manual_seed(0))
    assert shared.shape == (6, 3, 3) and inl.shape == (6,)
    assert Q.corner_distance(shared, rep).max() < 1e-5
    assert torch.equal(inl, inl_rep)


def test_chunks_cover_the_batch_in_order():
    assert Q._chunks(5, 10, torch.device("cpu")) == [slice(0, 5)]
    n = Q._CHUNK_NUMBERS["cpu"]
    assert Q._chunks(5, n // 2, torch.device("cpu")) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert Q._chunks(3, 10 * n, "cpu") == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least a pair


def test_chunked_search_and_refinement_are_the_unchunked(monkeypatch):
    """Chunks of pairs (to stay in a CPU's caches) change nothing but rounding: rows are independent
    and RANSAC draws its random numbers once per call of ransac_homography, whatever the chunks."""
    pairs = [make_pair("camera", rho=12, seed=5, patch=64), make_pair("coffee", rho=12, seed=6, patch=64),
             make_pair("astronaut", rho=12, seed=7, patch=64)]
    src = torch.stack([chw(p.source) for p in pairs])
    tgt = torch.stack([chw(p.target) for p in pairs])

    def run():
        M, score = Q.global_search(src, tgt, generator=torch.Generator().manual_seed(0))
        return M, score, Q.refine_homography(src, tgt, M[:, 0])

    monkeypatch.setitem(Q._CHUNK_NUMBERS, "cpu", 1 << 40)
    whole = run()
    monkeypatch.setitem(Q._CHUNK_NUMBERS, "cpu", 1)  # a pair at a time
    chunked = run()
    # the same to float rounding (a batch's size may change how a product is blocked)
    assert Q.corner_distance(whole[0], chunked[0]).max() < 1e-5
    assert torch.allclose(whole[1], chunked[1], atol=1e-5)
    assert Q.corner_distance(whole[2][0], chunked[2][0]).max() < 1e-5
    assert torch.allclose(whole[2][1], chunked[2][1], atol=1e-5)


def _truth_norm(pairs, size):
    return torch.stack([G.normalised_from_pixel(torch.from_numpy(p.source_from_target)[None], size, size)[0]
                        for p in pairs]).float()


def test_orientation_field_ignores_inversion_and_is_zero_outside_its_mask():
    x = chw(make_pair("camera", seed=1).source)[None]
    f = Q.orientation_field(x)
    assert f.shape == (1, 2, 96, 96)
    assert torch.allclose(Q.orientation_field(1 - x), f, atol=1e-5)  # orientation modulo pi only
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 10:60, 20:80] = 1
    fm = Q.orientation_field(x, mask)
    assert fm[..., :10, :].abs().max() == 0 and fm[..., 10:60, 20:80].abs().max() > 0


def test_refinement_recovers_a_known_homography_to_a_tenth_of_a_pixel():
    """A clean textured pair and a start about 2 px off (where the search can leave a pair): the
    refinement lands within 0.1 px of the true homography, for a grayscale target and for an inverted
    one (whose orientation field is the same); against a colour source (its channels' gradients
    summed, not the luminance's) within 0.3 px (measured 0.18)."""
    lum = np.array([0.299, 0.587, 0.114], np.float32)
    colour = make_pair("coffee", rho=16, seed=4, modality="inverted")
    gray = make_pair("coffee", rho=16, seed=4, modality="inverted")
    gray.source = gray.source @ lum
    pairs = [make_pair("astronaut", rho=16, seed=3), gray, colour]
    truth = _truth_norm(pairs, (96, 96))
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 8, generator=g, dtype=torch.float64).sign() * 0.035  # each corner moved 2.3 px
    start = truth @ G.offsets_to_homography(d).float()
    src = torch.stack([chw(p.source).expand(3, -1, -1) for p in pairs])
    tgt = torch.stack([chw(p.target) for p in pairs])
    M, score = Q.refine_homography(src, tgt, start)
    before, after = _corner_errors(start, pairs, (96, 96)), _corner_errors(M, pairs, (96, 96))
    assert (before > 1.5).all(), before
    assert (after[:2] < 0.1).all() and after[2] < 0.3, after
    assert (score > 0.5).all()


def test_refinement_keeps_the_start_where_it_does_not_raise_the_correlation(monkeypatch):
    p = make_pair("chelsea", rho=16, seed=2)
    src, tgt = chw(p.source)[None], chw(p.target)[None]
    truth = _truth_norm([p], (96, 96))
    start = truth @ G.offsets_to_homography(torch.full((1, 8), 0.02, dtype=torch.float64)).float()
    good, _ = Q.refine_homography(src, tgt, start)
    assert not torch.equal(good, start)  # a working refinement moves it
    # a refinement that fails: every step a shift of 3 px, which lowers the correlation
    monkeypatch.setattr(Q, "_ecc_step", lambda ft, fw, valid: torch.tensor([[0, 0, 0.06, 0, 0, 0.06, 0, 0]]))
    kept, score = Q.refine_homography(src, tgt, start)
    assert torch.equal(kept, start)
    assert torch.isfinite(score).all()


def test_a_pairs_refinement_does_not_depend_on_its_batch():
    a, b = make_pair("camera", rho=16, seed=7), make_pair("coffee", rho=16, seed=8)
    ta, tb = _truth_norm([a], (96, 96)), _truth_norm([b], (96, 96))
    off = G.offsets_to_homography(torch.full((1, 8), 0.03, dtype=torch.float64)).float()
    alone, _ = Q.refine_homography(chw(a.source)[None], chw(a.target)[None], ta @ off)
    both, _ = Q.refine_homography(torch.stack([chw(b.source), chw(a.source)]), torch.stack([chw(b.target), chw(a.target)]),
                                  torch.cat([tb @ off.inverse(), ta @ off]))
    assert Q.corner_distance(alone[0], both[1]).item() < 1e-5


def test_block_agreement_is_high_at_the_truth_and_low_off_it_or_for_unrelated_images():
    """At the true homography most textured blocks find their correspondent where it puts them (a
    grayscale target and an inverted one against a colour source); the same pairs 4 px off (a
    translation, four times the tolerance), and an unrelated pair at the identity, score below the
    learned method's threshold (0.25). The score is a share: in [0, 1]."""
    pairs = [make_pair("astronaut", rho=16, seed=3), make_pair("coffee", rho=16, seed=4, modality="inverted", gray=False)]
    truth = _truth_norm(pairs, (96, 96))
    src = torch.stack([chw(p.source).expand(3, -1, -1) for p in pairs])
    tgt = torch.stack([chw(p.target) for p in pairs])
    at, counted = Q.block_agreement(src, tgt, truth)
    assert (at > 0.6).all() and (at <= 1).all(), at
    assert (counted >= 10).all(), counted
    shift = torch.eye(3).repeat(2, 1, 1)
    shift[:, 0, 2] = 4 * 2 / 95  # 4 px of the 96-px target, in normalised units
    off, _ = Q.block_agreement(src, tgt, truth @ shift)
    assert (off < 0.25).all() and (off >= 0).all(), off
    a, b = make_pair("chelsea", seed=3), make_pair("rocket", seed=4)
    unrelated, _ = Q.block_agreement(chw(a.source)[None], chw(b.target)[None], torch.eye(3)[None])
    assert 0 <= unrelated.item() < 0.25, unrelated


def test_block_agreement_of_a_pair_does_not_depend_on_its_batch_and_is_zero_for_no_homography():
    a, b = make_pair("camera", rho=16, seed=7), make_pair("coffee", rho=16, seed=8)
    ta, tb = _truth_norm([a], (96, 96)), _truth_norm([b], (96, 96))
    alone, _ = Q.block_agreement(chw(a.source)[None], chw(a.target)[None], ta)
    both, _ = Q.block_agreement(torch.stack([chw(b.source), chw(a.source)]), torch.stack([chw(b.target), chw(a.target)]),
                                torch.cat([tb, ta]))
    assert torch.allclose(alone[0], both[1], atol=1e-6)
    nan = torch.full((1, 3, 3), float("nan"))
    none, _ = Q.block_agreement(chw(a.source)[None], chw(a.target)[None], nan)
    assert none.item() == 0
