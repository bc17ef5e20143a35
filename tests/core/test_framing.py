"""Ground-truth-free framing checks (content kept, area scale) and the warnings they raise."""
import json

import numpy as np
import pytest
import torch

from models import geometry as G
from models import metrics as M
from models.imageops import background


def _blob(n=2, size=32, half=10, dark_on_light=False):
    x = torch.zeros(n, 1, size, size, dtype=torch.float64)
    c = size // 2
    x[:, :, c - half:c + half, c - half:c + half] = 1.0
    return 1 - x if dark_on_light else x


def _scale_about_centre(s, size=32, n=2):
    """Pixel ``in_from_out`` scaling by ``s`` about the frame centre (s < 1 zooms in)."""
    c = (size - 1) / 2
    T = torch.tensor([[s, 0, c * (1 - s)], [0, s, c * (1 - s)], [0, 0, 1]], dtype=torch.float64)
    return T.expand(n, 3, 3)


@pytest.mark.parametrize("dark", [False, True])
def test_framing_against_exact_zooms(dark):
    x = _blob(dark_on_light=dark)  # a 20 px square in a 32 px frame
    bg = background(x)
    kept, area = M.framing(x, _scale_about_centre(1.0), (32, 32), bg)
    assert torch.allclose(kept, torch.ones(2, dtype=kept.dtype), atol=1e-6)
    assert torch.allclose(area, torch.ones(2, dtype=area.dtype), atol=1e-9)
    # Zoom in 2x: the frame covers the central 16x16 input pixels of the 20x20 square.
    kept, area = M.framing(x, _scale_about_centre(0.5), (32, 32), bg)
    assert torch.allclose(area, torch.full((2,), 0.25, dtype=area.dtype), atol=1e-9)
    assert kept.max() < 0.7 and kept.min() > 0.6  # (16/20)^2 = 0.64
    # Zoom out 2x: everything is kept, shown at a quarter of its area.
    kept, area = M.framing(x, _scale_about_centre(2.0), (32, 32), bg)
    assert torch.allclose(kept, torch.ones(2, dtype=kept.dtype), atol=0.02)
    assert torch.allclose(area, torch.full((2,), 4.0, dtype=area.dtype), atol=1e-9)


def test_frame_size_against_exact_zooms_and_a_known_quadrilateral():
    for s in (0.5, 1.0, 2.0):
        assert torch.allclose(M.frame_size(_scale_about_centre(s), (32, 32)), torch.full((2,), s, dtype=torch.float64))
    shift = torch.eye(3, dtype=torch.float64)
    shift[:2, 2] = torch.tensor([7.0, -3.0])
    assert M.frame_size(shift[None], (32, 32)).item() == pytest.approx(1.0)
    # Frame corners (0,0),(31,0),(31,31),(0,31) onto a trapezoid of area (62 + 31) / 2 * 31.
    c = G.corners(32, 32, like=shift)[None]
    quad = torch.tensor([[[0.0, 0.0], [62.0, 0.0], [46.5, 31.0], [15.5, 31.0]]], dtype=torch.float64)
    H = G.homography_from_points(c, quad)
    assert M.frame_size(H, (32, 32)).item() == pytest.approx((46.5 * 31 / 31**2) ** 0.5, rel=1e-9)


def test_warnings_name_the_degenerate_mode():
    from models.pipeline import _framing_warnings

    assert _framing_warnings(torch.tensor([1.0, 0.95]), torch.tensor([1.0, 1.2])) == []
    (w,) = _framing_warnings(torch.tensor([0.1, 0.2, 0.9]), torch.ones(3))
    assert "crops into the objects" in w and "0.20" in w and "moment_weight" in w
    (w,) = _framing_warnings(torch.ones(3), torch.full((3,), 6.0))
    assert "shrinks" in w


def test_images_that_lose_their_object_are_counted_and_warned_about():
    from models.metrics import lost_images
    from models.pipeline import _lost_warnings

    kept = torch.tensor([1.0, 0.49, 0.9, 0.9, 0.9, float("nan")])
    area = torch.tensor([1.0, 1.0, 6.5, 1 / 6.5, 5.9, 1.0])
    assert lost_images(kept, area).tolist() == [False, True, True, True, False, True]
    assert _lost_warnings(0, 3) == []
    (w,) = _lost_warnings(int(lost_images(kept, area).sum()), len(kept))
    assert w.startswith("4 of 6 images (66.7%) lost their object") and "per_image[].content_kept" in w


def test_frame_geometry_against_exact_answers():
    from models.metrics import centre_scale, frames_off, stray_warps

    eye = torch.eye(3, dtype=torch.float64)
    M = eye.repeat(7, 1, 1)
    M[1, :2, :2] *= 2.0  # the frame covers 2x the input's side: 4x the area at the centre
    M[2, 0, 2] = 2.5  # shifted 2.5 half-widths: the centre beyond 2, the far corners at 3.5
    M[3, 0, 2] = 1.5  # the centre at 1.5, the far corners at 2.5
    M[4, 2, 0] = 1.0  # w = 1 + x: the left corners on the horizon
    M[5, 0, 0] = float("nan")
    M[6, 2, :2] = 0.4  # w = 1 + 0.4 (x + y): the corner (-1, -1) at w = 0.2, q = (-5, -5); the centre unchanged
    assert centre_scale(M[[0, 1, 2, 6]]).tolist() == pytest.approx([1.0, 4.0, 1.0, 1.0])
    # known Jacobians at the origin: x scaled by 3; and (x, y) -> (x + 1, y) / (1 + x), whose
    # derivative there is [[1 - 1, 0], [0, 1]] (d/dx (x + 1) / (1 + x) = 0): a determinant of 0
    A = eye.repeat(2, 1, 1)
    A[0, 0, 0] = 3.0
    A[1, 0, 2], A[1, 2, 0] = 1.0, 1.0
    assert centre_scale(A).tolist() == pytest.approx([3.0, 0.0])
    assert frames_off(M).tolist() == [False, False, True, False, True, True, False]
    start = eye.repeat(7, 1, 1)
    assert stray_warps(M, start).tolist() == [False, False, True, False, True, True, False]
    assert stray_warps(M, start, area=3.9).tolist() == [False, True, True, False, True, True, False]
    assert stray_warps(start[:1], M[1:2]).tolist() == [False]  # a quarter of the start's area
    assert stray_warps(start[:1], M[1:2], area=3.9).tolist() == [True]


def test_apply_flags_the_images_whose_warps_strayed(tmp_path, untrained_model, monkeypatch):
    """A real saved aligner whose network output is scripted to send two images' frames off:
    those two get the moment alignment, per_image.npy and metrics.json say which, and the job warns."""
    from models.data import mnist_digits
    from models.dprc import DPRCAligner
    from models.pipeline import apply_model

    model = untrained_model(tmp_path / "model", 0.4)
    cfg = json.loads((model / "config.json").read_text())
    cfg["fallback"] = True
    (model / "config.json").write_text(json.dumps(cfg))
    x = (mnist_digits(3, 6).numpy()[:, 0] * 255).astype("uint8")
    np.save(tmp_path / "d.npy", x)
    real = DPRCAligner._warps_from

    def straying(self, xb, M0, limit=None, passes=None):
        out = real(self, xb, M0, limit, passes).clone()
        out[1::3, 0, 2] += 5.0  # rows 1 and 4 of the 6
        return out

    monkeypatch.setattr(DPRCAligner, "_warps_from", straying)
    apply_model(model, tmp_path / "d.npy", tmp_path / "out", device="cpu")
    per = np.load(tmp_path / "out" / "per_image.npy")
    assert per["fallback"].tolist() == [0, 1, 0, 0, 1, 0]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["framing_summary"]["n_fallback"] == 2
    assert [e["fallback"] for e in m["per_image"]] == [False, True, False, False, True, False]
    assert m["warnings"][0].startswith("2 of 6 images (33.3%) got the initial (moment) alignment")
    # the moment alignment keeps the digits: nothing lost
    assert m["framing_summary"]["n_lost"] == 0
    monkeypatch.setattr(DPRCAligner, "_warps_from", real)
    cfg["fallback"] = False
    (model / "config.json").write_text(json.dumps(cfg))
    apply_model(model, tmp_path / "d.npy", tmp_path / "out2", device="cpu")
    m = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m["framing_summary"]["n_fallback"] is None
    assert (np.load(tmp_path / "out2" / "per_image.npy")["fallback"] == -1).all()  # not checked
    assert "fallback" not in m["per_image"][0]


def test_apply_with_a_cropping_aligner_warns(tmp_path, untrained_model):
    """An aligner whose moment reference is huge zooms 2.5x into every digit."""
    from models.data import mnist_digits
    from models.pipeline import apply_model

    model = untrained_model(tmp_path / "model", 10.0)
    x = (mnist_digits(3, 6).numpy()[:, 0] * 255).astype("uint8")
    np.save(tmp_path / "d.npy", x)
    rep = apply_model(model, tmp_path / "d.npy", tmp_path / "out", device="cpu")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["framing_summary"]["content_kept_median"] < 0.85 and m["framing_summary"]["n_cropped"] >= 1
    assert m["framing_summary"]["area_scale_median"] == pytest.approx(0.16, rel=0.05)  # (1 / 2.5)^2
    assert rep.warnings and rep.warnings == m["warnings"] and "crops into the objects" in m["warnings"][0]
    assert all(0 <= e["content_kept"] <= 1.5 for e in m["per_image"])
    per = np.load(tmp_path / "out" / "per_image.npy")
    lost = (per["content_kept"] < 0.5) | (per["area_scale"] < 1 / 6) | (per["area_scale"] > 6)
    assert m["framing_summary"]["n_lost"] == int(lost.sum())
    assert any("lost their object" in w for w in m["warnings"]) == bool(lost.any())


def test_edge_contact_against_exact_answers():
    x = torch.zeros(3, 1, 32, 32, dtype=torch.float64)
    x[0, :, 10:20, 11:21] = 1.0  # clear of the border
    x[1, :, 10:20, 0:10] = 1.0  # touches the left border along 10 pixels
    x[2] = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))  # texture up to the border
    contact, plain = M.edge_contact(x, background(x))
    assert contact[0].item() == 0.0
    # 10 of the ring's 124 pixels are foreground, 100 of the image's 1024.
    assert contact[1].item() == pytest.approx((10 / 124) / (100 / 1024))
    assert plain.tolist() == [True, True, False]


def test_border_flags_name_the_cut_images_and_stay_off_on_textured_collections(tmp_path, untrained_model):
    from models.data import mnist_digits
    from models.pipeline import apply_model

    model = untrained_model(tmp_path / "model", 0.45)
    x = (mnist_digits(3, 6).numpy()[:, 0] * 255).astype("uint8")
    x[:4] = np.roll(x[:4], 7, axis=2)  # four digits moved 7 px right: three reach the border, the narrow one does not
    np.save(tmp_path / "d.npy", x)
    apply_model(model, tmp_path / "d.npy", tmp_path / "out", device="cpu")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [e["touches_edge"] for e in m["per_image"]] == [True, False, True, True, False, False]
    assert m["framing_summary"]["n_touching_edge"] == 3
    assert any("3 of 6 images have their object touching the image border" in w for w in m["warnings"])

    noise = (np.random.default_rng(0).random((6, 28, 28)) * 255).astype("uint8")
    np.save(tmp_path / "n.npy", noise)
    apply_model(model, tmp_path / "n.npy", tmp_path / "out_n", device="cpu")
    m = json.loads((tmp_path / "out_n" / "metrics.json").read_text())
    assert m["framing_summary"]["n_touching_edge"] is None
    assert all(e["touches_edge"] is None and e["edge_contact"] > 0.5 for e in m["per_image"])
    assert not any("touching the image border" in w for w in m["warnings"])


def _four_dots(n: int, size: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of four Gaussian dots, one per quadrant, jittered; and the dots' template positions.

    The dots stay well inside their quadrants and the frame under the probes, so finding them is exact
    up to resampling."""
    g = torch.Generator().manual_seed(seed)
    tpl = torch.tensor([[12.0, 12.0], [27.0, 12.0], [27.0, 27.0], [12.0, 27.0]])
    pts = tpl + 1.0 * torch.randn(n, 4, 2, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    d2 = (xx[None, None] - pts[..., 0, None, None]) ** 2 + (yy[None, None] - pts[..., 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * 1.2 ** 2)).sum(1, keepdim=True), tpl


def _dot_aligner(tpl: torch.Tensor, size: int = 40):
    """Finds each quadrant's dot and maps the template's dots onto them: exactly equivariant."""
    h = size // 2

    def align(x):
        f = x[:, 0].double()
        ys, xs = torch.meshgrid(torch.arange(size, dtype=f.dtype), torch.arange(size, dtype=f.dtype), indexing="ij")
        found = []
        for r0, c0 in ((0, 0), (0, h), (h, h), (h, 0)):
            q = f[:, r0:r0 + h, c0:c0 + h]
            m = q.sum(dim=(1, 2))
            found.append(torch.stack([(q * xs[r0:r0 + h, c0:c0 + h]).sum(dim=(1, 2)) / m,
                                      (q * ys[r0:r0 + h, c0:c0 + h]).sum(dim=(1, 2)) / m], -1))
        H = G.homography_from_points(tpl.double().expand(x.shape[0], 4, 2), torch.stack(found, 1))
        return G.normalised_from_pixel(H, (size, size), (size, size))

    return align


def test_self_consistency_is_zero_for_an_equivariant_aligner_and_the_probe_for_a_blind_one():
    x, tpl = _four_dots(12)
    bg = torch.zeros(12, 1, 1, 1)
    moved, probe = M.self_consistency(_dot_aligner(tpl), x, bg, sigma=0.03, seed=3)
    # Not exactly 0: bilinear resampling shifts the dots' centroids by a few hundredths of a pixel, and
    # the frame's corners lie ~2x further out than the dots. A blind aligner scores 1.
    assert probe.mean() > 1.0 and moved.mean() / probe.mean() < 0.1
    blind = lambda b: torch.eye(3, dtype=torch.float64).expand(b.shape[0], 3, 3)  # noqa: E731
    moved, probe2 = M.self_consistency(blind, x, bg, sigma=0.03, seed=3)
    assert torch.allclose(moved, probe2) and torch.allclose(probe, probe2)  # the same probes for one seed
    T = G.params_to_matrix(torch.tensor([[0.1, 0.0, 0.0, 0.2, 0.05, -0.03]]), "affine").double()
    const = lambda b: T.expand(b.shape[0], 3, 3)  # noqa: E731
    moved, _ = M.self_consistency(const, x, bg, sigma=0.03, seed=3)
    assert not torch.allclose(moved, probe2) and (moved > 0).all()


def test_self_consistency_with_the_known_warps_aligns_only_the_copies():
    """Given ``align(images)`` (a fitted collection's warps) the check gives the same numbers and
    calls the aligner only on the re-warped copies."""
    x, tpl = _four_dots(12)
    bg = torch.zeros(12, 1, 1, 1)
    align = _dot_aligner(tpl)
    seen = []

    def counting(b):
        seen.append(b.shape[0])
        return align(b)

    ref = M.self_consistency(align, x, bg, sigma=0.03, seed=3, chunk=5)
    got = M.self_consistency(counting, x, bg, sigma=0.03, seed=3, chunk=5, warps=align(x))
    assert torch.allclose(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert seen == [5, 5, 2]


def test_self_consistency_at_the_object_is_zero_for_an_equivariant_aligner_and_one_for_a_blind_one():
    x, tpl = _four_dots(12)
    bg = torch.zeros(12, 1, 1, 1)
    moved, probe = M.self_consistency(_dot_aligner(tpl), x, bg, sigma=0.03, seed=3, at="object")
    assert probe.mean() > 0.5 and moved.mean() / probe.mean() < 0.1
    blind = lambda b: torch.eye(3, dtype=torch.float64).expand(b.shape[0], 3, 3)  # noqa: E731
    moved, probe2 = M.self_consistency(blind, x, bg, sigma=0.03, seed=3, at="object")
    assert torch.allclose(moved, probe2) and torch.allclose(probe, probe2)
    # A common change of the aligned frame (every warp composed with one zoom) changes nothing at
    # the object, while it scales the distances at the frame's corners.
    Z = G.params_to_matrix(torch.tensor([[0.5, 0.0, 0.1, 0.0]]), "similarity").double()
    zoomed = lambda b: _dot_aligner(tpl)(b) @ Z  # noqa: E731
    a = M.self_consistency(zoomed, x, bg, sigma=0.03, seed=3, at="object")[0]
    b = M.self_consistency(_dot_aligner(tpl), x, bg, sigma=0.03, seed=3, at="object")[0]
    assert torch.allclose(a, b, atol=1e-9)
    c = M.self_consistency(zoomed, x, bg, sigma=0.03, seed=3)[0]
    d = M.self_consistency(_dot_aligner(tpl), x, bg, sigma=0.03, seed=3)[0]
    assert not torch.allclose(c, d, atol=1e-3)


def test_evenly_spaced_indices():
    assert M.evenly_spaced(12, 5).tolist() == [0, 3, 6, 8, 11]
    assert M.evenly_spaced(4, 10).tolist() == [0, 1, 2, 3]  # at most every index
    assert M.evenly_spaced(1, 3).tolist() == [0]


def test_sampled_self_consistency_is_the_check_on_the_evenly_spaced_images():
    x, tpl = _four_dots(12)
    align = _dot_aligner(tpl)
    warps = align(x)
    got = M.sampled_self_consistency(align, x, warps, 5, bg=torch.zeros(12, 1, 1, 1), seed=3)
    idx = [0, 3, 6, 8, 11]
    ref = M.self_consistency(align, x[idx], torch.zeros(5, 1, 1, 1), seed=3, at="object", warps=warps[idx])
    assert torch.allclose(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # uint8 images are read as 0-255; an aligner that ignores the image scores exactly 1
    blind = lambda b: torch.eye(3, dtype=b.dtype).expand(b.shape[0], 3, 3)  # noqa: E731
    u8 = (x * 255).round().to(torch.uint8)
    moved, probe = M.sampled_self_consistency(blind, u8, blind(u8.float()), 7)
    assert moved.shape == (7,) and M.consistency_ratio(moved, probe) == pytest.approx(1.0)


def test_the_consistency_warning_reads_the_ratio_at_the_objects():
    from models.metrics import CONSISTENCY_WARN
    from models.pipeline import _consistency_summary, _consistency_warnings

    moved, probe = torch.tensor([3.0, 1.0]), torch.tensor([4.0, 4.0])
    s = _consistency_summary(moved, probe, 0.26, 2)
    assert s["ratio"] == 0.5 and s["object_ratio"] == 0.26 and s["object_sample"] == 2
    assert CONSISTENCY_WARN == 0.25 and "0.26 times" in _consistency_warnings(s)[0]
    assert _consistency_warnings(_consistency_summary(moved, probe, 0.25, 2)) == []  # at the limit: no warning
    # the corner ratio alone (0.5 here, 3.0 below) never warns: it grows with the frame, not the misalignment
    assert _consistency_warnings(_consistency_summary(torch.tensor([12.0]), torch.tensor([4.0]), 0.1, 1)) == []
    assert _consistency_warnings(None) == [] and _consistency_summary(None, None) is None
