"""Pair jobs end to end (models/pairwise/pipeline.py): the published convention in original pixels,
point transfer, the output folder, pair files and names. The estimates come from ECC (OpenCV), the
fastest real method."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from models.imageio import InputError
from models.pairwise import points as P
from models.pairwise import synthetic as S
from models.pairwise.pipeline import (PairInput, PairOptions, PairResult, align_pair, align_pairs, read_pairs_file,
                                      run_pairs, warp_source, write_pairs)
from pairlib import make_pair

pytest.importorskip("cv2")


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _np_backward_warp(img: np.ndarray, H: np.ndarray, out_hw) -> np.ndarray:
    """Independent reference of the convention: out(p) = in(H p), bilinear, pixel centres at integers,
    outside 0. ``img`` (h, w) float."""
    h, w = img.shape
    ys, xs = np.mgrid[0:out_hw[0], 0:out_hw[1]].astype(np.float64)
    q = np.stack([xs, ys, np.ones_like(xs)], -1) @ H.T
    u, v = q[..., 0] / q[..., 2], q[..., 1] / q[..., 2]
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fx, fy = u - x0, v - y0

    def at(x, y):
        ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        return np.where(ok, img[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)], 0.0)

    return (at(x0, y0) * (1 - fx) * (1 - fy) + at(x0 + 1, y0) * fx * (1 - fy) + at(x0, y0 + 1) * (1 - fx) * fy
            + at(x0 + 1, y0 + 1) * fx * fy)


def test_matrix_maps_target_pixels_to_source_pixels_of_the_originals():
    """At full size and at a working size a third as large, the published matrix is the truth in the
    original images' pixels (ECC's accuracy: well under a pixel at full size)."""
    p = make_pair("astronaut", rho=10, seed=5, patch=144)
    full = align_pair(_u8(p.source), _u8(p.target), PairOptions(method="ecc", device="cpu", max_side=1024))
    small = align_pair(_u8(p.source), _u8(p.target), PairOptions(method="ecc", device="cpu", max_side=48))
    assert full.aligned and full.source_size == (144, 144)
    assert S.corner_error(full.matrix, p.source_from_target, (144, 144)) < 0.5
    assert S.corner_error(small.matrix, p.source_from_target, (144, 144)) < 3.0  # a 3x coarser estimate


def test_sizes_may_differ_between_source_and_target():
    p = make_pair("camera", rho=6, seed=2, patch=128)
    src = np.asarray(Image.fromarray(_u8(p.source)).resize((192, 192), Image.BILINEAR))  # the source at 1.5x
    r = align_pair(src, _u8(p.target), PairOptions(method="ecc", device="cpu"))
    up = np.diag([1.5, 1.5, 1.0]) @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]]) - np.array(
        [[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])  # source pixels: x' = 1.5 (x + 0.5) - 0.5
    assert r.source_size == (192, 192) and r.target_size == (128, 128)
    assert S.corner_error(r.matrix, up @ p.source_from_target, (128, 128)) < 1.0


def test_warped_source_follows_the_published_convention():
    rng = np.random.default_rng(0)
    src = rng.random((40, 50)).astype(np.float32)
    M = np.array([[0.9, 0.1, 3.0], [-0.05, 1.1, 2.0], [1e-3, -5e-4, 1.0]])
    out = warp_source(src, M, (30, 35))
    assert out.shape == (30, 35)
    assert np.allclose(out, _np_backward_warp(src.astype(np.float64), M, (30, 35)), atol=1e-5)


def test_points_move_both_ways():
    M = np.array([[1.2, 0.1, 5.0], [0.0, 0.9, -3.0], [1e-3, 0.0, 1.0]])
    r = PairResult("p", M, 0.9, True, (50, 50), (50, 50), "ecc")
    pts = np.array([[0.0, 0.0], [10.0, 20.0], [49.0, 49.0]])
    there = r.target_to_source(pts)
    q = np.c_[pts, np.ones(3)] @ M.T
    assert np.allclose(there, q[:, :2] / q[:, 2:])
    assert np.allclose(r.source_to_target(there), pts)
    with pytest.raises(ValueError, match="direction"):
        P.transfer(M, pts, "sideways")
    # a point the homography sends to infinity comes back as nan, not as a huge number
    assert np.isnan(P.target_to_source(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], float), [[0.0, 5.0]])).all()


def test_output_folder_has_results_and_images_of_aligned_pairs_only(tmp_path):
    a = make_pair("astronaut", rho=8, seed=1)
    b = make_pair("coffee", rho=8, seed=2)
    pairs = [PairInput(_u8(a.source), _u8(a.target), "ok"), PairInput(_u8(a.source), _u8(b.target), "ok")]
    res = align_pairs(pairs, PairOptions(method="ecc", device="cpu", min_confidence=0.9))
    assert [r.name for r in res] == ["ok", "ok-2"]  # names are unique
    assert res[0].aligned and not res[1].aligned  # ECC's correlation on unrelated images stays low
    doc = write_pairs(tmp_path / "out", pairs, res, points=[{"target": [[1, 2]], "source": []}, None],
                      meta={"method": "ecc"})
    on_disk = json.loads((tmp_path / "out" / "pairs.json").read_text())
    assert on_disk == doc and doc["n_pairs"] == 2 and doc["n_aligned"] == 1 and "TARGET" in doc["convention"]
    first, second = doc["pairs"]
    assert sorted(first["files"]) == ["checkerboard", "overlay", "warped"] and second["files"] == {}
    for f in first["files"].values():
        im = np.asarray(Image.open(tmp_path / "out" / f))
        assert im.shape[:2] == (96, 96)
    assert np.allclose(first["points"]["target_in_source"], res[0].target_to_source([[1, 2]]))
    assert "points" not in second


def test_run_pairs_reads_a_pairs_file(tmp_path):
    p = make_pair("camera", rho=6, seed=3)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(_u8(p.source)).save(d / "a.png")
    Image.fromarray(_u8(p.target)).save(d / "b.png")
    (d / "pairs.csv").write_text("source,target,name\na.png,b.png,first\n\nb.png,a.png\n")
    specs = read_pairs_file(d / "pairs.csv")
    assert [s[2] for s in specs] == ["first", ""] and specs[0][0] == str(d / "a.png")
    rep = run_pairs(specs, tmp_path / "out", PairOptions(method="ecc", device="cpu"))
    assert rep["n_pairs"] == 2 and rep["n_images"] == 2 and rep["n_aligned"] == 2
    doc = json.loads((tmp_path / "out" / "pairs.json").read_text())
    fwd, back = (np.array(e["matrix"]) for e in doc["pairs"])
    assert [e["name"] for e in doc["pairs"]] == ["first", "0001"]
    assert S.corner_error(fwd @ back, np.eye(3), (96, 96)) < 0.5  # b->a is a->b inverted


@pytest.mark.parametrize("text, msg", [("a.png\n", "expected 'source,target"), ("", "no pairs"),
                                       ("a.png,b.png,c,d\n", "expected")])
def test_bad_pairs_files_are_refused_with_the_line(tmp_path, text, msg):
    f = tmp_path / "p.csv"
    f.write_text(text)
    with pytest.raises(InputError, match=msg):
        read_pairs_file(f)


def test_unknown_method_or_option_is_an_input_error():
    p = make_pair(patch=64)
    with pytest.raises(ValueError, match="unknown method"):
        align_pair(_u8(p.source), _u8(p.target), PairOptions(method="nope", device="cpu"))
    with pytest.raises(InputError, match="unknown option"):
        align_pair(_u8(p.source), _u8(p.target), PairOptions(method="learned", device="cpu",
                                                             method_options={"stpes": 3}))
    with pytest.raises(InputError, match="no such image"):
        run_pairs([("/nonexistent/a.png", "/nonexistent/b.png", "")], "/tmp/never-written")
