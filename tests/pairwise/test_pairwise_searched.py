"""The pair method ``search`` (models/pairwise/searched.py): recovery of known homographies within and
across modalities, a low confidence for unrelated images, the learned method's matrix when that one
holds the homography, and refusals of bad options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pairlib import chw, make_pair

from models import geometry as G
from models.catalog import create_pair_method
from models.imageio import InputError
from models.methods import Cancelled
from models.pairwise import search as Q
from models.pairwise import synthetic as S
from models.pairwise.methods import PairContext
from models.pairwise.pipeline import PairOptions, align_pair
from models.pairwise.searched import SearchMethod, SearchMethodConfig, search_pairs

SIZE = (96, 96)


def _errors(M_norm: torch.Tensor, pairs) -> np.ndarray:
    M = G.pixel_from_normalised(M_norm.double(), SIZE, SIZE).numpy()
    return np.array([S.corner_error(M[i], p.source_from_target, SIZE) for i, p in enumerate(pairs)])


def _batch(pairs, sources=None):
    src = torch.stack([chw(p.source).expand(3, -1, -1) for p in (sources or pairs)])  # one batch: all in colour
    return src, torch.stack([chw(p.target) for p in pairs])


def test_recovers_known_homographies_and_says_when_it_cannot():
    """One batch: a grayscale target and an inverted one with corners moved by up to +-24 px (a quarter
    of the image), a non-monotonically remapped one by up to +-16 px, all against colour sources; and
    two unrelated images. The three are recovered to under a pixel and called aligned; the unrelated
    pair scores far below the threshold."""
    pairs = [make_pair("astronaut", rho=24, seed=5), make_pair("coffee", rho=24, seed=6, modality="inverted"),
             make_pair("chelsea", rho=16, seed=2, modality="remap")]
    a, b = make_pair("chelsea", seed=3), make_pair("rocket", seed=4)
    src, tgt = _batch(pairs + [b], pairs + [a])
    fit = search_pairs(src, tgt)
    start = np.array([S.corner_error(np.eye(3), p.source_from_target, SIZE) for p in pairs])
    err = _errors(fit.source_from_target_norm[:3], pairs)
    assert (start > 12).all(), start  # the identity is far off
    assert (err < 1.0).all(), err  # measured 0.02, 0.09, 0.14 px
    conf = fit.confidence.numpy()
    assert (conf[:3] > 0.6).all(), conf  # measured 0.85, 0.88, 0.90
    assert conf[3] < 0.5 * SearchMethod.min_confidence, conf  # measured 0.00
    assert fit.refined[:3].all()  # the refinement raised the correlation of each related pair
    assert (fit.blocks_counted >= 4).all()


def test_without_the_refinement_it_is_the_searchs_best_candidate():
    p = make_pair("camera", rho=16, seed=7, patch=64)
    src, tgt = chw(p.source)[None], chw(p.target)[None]
    fit = search_pairs(src, tgt, SearchMethodConfig(refine=False, seed=3))
    cands, _ = Q.global_search(src, tgt, SearchMethodConfig().search_config(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(fit.source_from_target_norm, cands[:, 0]) and not fit.refined.any()


def test_it_is_the_learned_methods_matrix_when_that_holds_the_homography():
    """The learned method with ``search_joint=False`` trains its network at the searched homography
    and changes nothing else: the same matrix and the same confidence as ``search``, seed for seed."""
    from models.pairwise.learned import LearnedConfig, fit_pairs

    p = make_pair("coffee", rho=16, seed=4, modality="inverted", gray=False)
    src, tgt = chw(p.source)[None], chw(p.target)[None]
    held = fit_pairs(src, tgt, LearnedConfig(search_joint=False, search_steps=(1,), keypoints=16, eval_keypoints=32,
                                             seed=5))
    fit = search_pairs(src, tgt, SearchMethodConfig(seed=5))
    assert torch.allclose(held.source_from_target_norm, fit.source_from_target_norm, atol=1e-6)
    assert torch.allclose(held.confidence, fit.confidence)
    assert _errors(fit.source_from_target_norm, [p])[0] < 1.0


def test_the_default_pair_method_is_search():
    p = make_pair("astronaut", rho=16, seed=3)
    assert PairOptions().method == "search"
    r = align_pair((p.source * 255 + 0.5).astype(np.uint8), (p.target * 255 + 0.5).astype(np.uint8),
                   PairOptions(device="cpu"))
    assert r.method == "search" and r.aligned and r.confidence > 0.6, r
    assert S.corner_error(r.matrix, p.source_from_target, SIZE) < 1.0


@pytest.mark.parametrize("options, error, text", [
    ({"steps": [5]}, TypeError, "unknown option(s) steps; known: candidates, refine, seed, size"),
    ({"size": 8}, ValueError, "size must be from 16 to 512, not 8"),
    ({"size": 64.5}, TypeError, "size must be an integer"),
    ({"candidates": 0}, ValueError, "candidates must be from 1 to 32"),
    ({"refine": "yes"}, TypeError, "refine must be true or false"),
])
def test_bad_options_are_refused_with_a_clear_error(options, error, text):
    with pytest.raises(error) as e:
        create_pair_method("search", **options)
    assert text in str(e.value)
    p = make_pair(patch=32)
    with pytest.raises(InputError, match="method search: "):  # the pipeline's error names the method
        align_pair(p.source, p.target, PairOptions(device="cpu", method_options=options))


def test_options_are_the_config_and_round_trip():
    m = create_pair_method("search", size=96, candidates=4, refine=False)
    assert m.config.to_dict() == {"size": 96, "candidates": 4, "refine": False, "seed": 0}
    assert SearchMethodConfig(**m.config.to_dict()) == m.config
    cfg = m.config.search_config()
    assert (cfg.size, cfg.candidates, cfg.keep) == (96, 4, 2)
    assert SearchMethodConfig(candidates=1).search_config().keep == 1


def test_it_reports_progress_and_stops_when_asked():
    p = make_pair(patch=48)
    src, tgt = chw(p.source)[None], chw(p.target)[None]
    seen = []
    create_pair_method("search").estimate(src, tgt, PairContext(progress=lambda d, t, s: seen.append((d, t, s))))
    assert seen == [(1, 3, "search"), (2, 3, "refinement"), (3, 3, "confidence")]
    with pytest.raises(Cancelled):
        create_pair_method("search").estimate(src, tgt, PairContext(should_stop=lambda: True))
