"""The classic references (models/pairwise/classic.py): each recovers a known homography on a
same-modality pair in the product's convention, and says what to install when its library is missing."""
from __future__ import annotations

import sys

import pytest
import torch

from models.pairwise import synthetic as S
from models.pairwise.classic import MissingDependency, ransac_confidence
from models.catalog import create_pair_method, list_pair_methods
from models.pairwise.methods import PairContext
from models.pairwise.pipeline import PairOptions, align_pair
from pairlib import chw, make_pair

pytest.importorskip("cv2")
pytest.importorskip("kornia")


def test_the_registry_holds_the_learned_method_and_the_references():
    assert list_pair_methods() == ["ecc", "kornia", "learned", "orb", "search", "semantic", "sift"]
    from models.catalog import list_methods

    assert "learned" not in list_methods()  # pair methods are not collection methods


@pytest.mark.parametrize("method, tol", [("sift", 1.0), ("orb", 3.0), ("ecc", 0.5), ("kornia", 3.0)])
def test_recovers_a_known_homography(method, tol):
    p = make_pair("astronaut", rho=8, seed=7, patch=128)
    r = align_pair(p.source, p.target, PairOptions(method=method, device="cpu"))
    assert r.matrix is not None and r.aligned, r
    assert S.corner_error(r.matrix, p.source_from_target, (128, 128)) < tol
    assert 0 < r.confidence <= 1


def test_a_method_that_finds_nothing_returns_no_matrix():
    """A flat target has no features: SIFT finds nothing, and says so with a missing matrix."""
    src = chw(make_pair(patch=64).source)[None]
    est = create_pair_method("sift").estimate(src, torch.full_like(src, 0.5), PairContext())
    assert not torch.isfinite(est.source_from_target_norm).any() and est.confidence.item() == 0


def test_ransac_confidence_needs_enough_inliers():
    assert ransac_confidence(7, 10) == 0 and ransac_confidence(30, 40) == 0.75 and ransac_confidence(0, 0) == 0


@pytest.mark.parametrize("method, missing, hint", [("sift", "cv2", "opencv-python-headless"),
                                                   ("ecc", "cv2", "opencv-python-headless"),
                                                   ("kornia", "kornia", "pip install kornia")])
def test_missing_library_says_what_to_install(monkeypatch, method, missing, hint):
    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to `import`
    if missing == "kornia":
        monkeypatch.setitem(sys.modules, "kornia.geometry", None)
    src = chw(make_pair(patch=64).source)[None]
    with pytest.raises(MissingDependency, match=hint):
        create_pair_method(method).estimate(src, src, PairContext())
    assert issubclass(MissingDependency, ImportError)
