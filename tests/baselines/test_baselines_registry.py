"""The baselines as methods of the core: registry, pipeline outputs, ``apply``,
options, progress, cancellation and checkpoints."""
import json

import numpy as np
import pytest
import torch

from models import geometry as G
from models.catalog import create_method, list_methods, load_aligner
from models.methods import Cancelled, FitContext
from models.pipeline import AlignOptions, align_collection, apply_model

METHODS = ["rasl", "pssv", "tgrasta", "lsc"]
SIZE = (28, 28)


def test_every_baseline_is_registered():
    assert set(METHODS) <= set(list_methods())
    for m in METHODS:
        assert create_method(m).name == m


@pytest.fixture
def npy_collection(tmp_path, warped_copies):
    imgs, W = warped_copies("homography", n=8, scale=0.05, seed=5)
    path = tmp_path / "digits.npy"
    np.save(path, (imgs[:, 0].numpy() * 255 + 0.5).astype(np.uint8))
    return path, imgs, W


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_writes_standard_outputs_and_apply_reuses_the_model(method, tmp_path, npy_collection):
    path, imgs, W = npy_collection
    out = tmp_path / "out"
    rep = align_collection(path, out, AlignOptions(method=method, warp="similarity", budget=6, device="cpu"))
    assert rep.method == method and rep.n_images == 8
    for f in ("transforms.json", "metrics.json", "mean_before.png", "var_before.png", "mean_after.png",
              "var_after.png", "model/config.json", "model/aligner.safetensors", "model/pipeline.json"):
        assert (out / f).is_file(), f
    assert len(list((out / "aligned").glob("*.png"))) == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["apsnr_after"] > metrics["apsnr_before"]
    assert json.loads((out / "model/config.json").read_text())["method"] == method
    assert not list((out / "model").glob("*.pt")) and not list((out / "model").glob("*.pkl"))
    rep2 = apply_model(out / "model", path, tmp_path / "applied", device="cpu")
    assert rep2.n_images == 8 and (tmp_path / "applied" / "transforms.json").is_file()
    assert rep2.apsnr_after > rep2.apsnr_before


def _distance_to_frame(W_fit, M_fit, W_new, M_new):
    """Mean distance (source px) of new images' aligned corners from the fitted images' mean corners."""
    def corners(W, M):
        pix = G.pixel_from_normalised(M.double(), SIZE, SIZE)
        return G.transform_points(W @ pix, G.corners(*SIZE, like=pix))  # (n, 4, 2)
    target = corners(W_fit, M_fit).mean(0, keepdim=True)
    return float((corners(W_new, M_new) - target).norm(dim=-1).mean())


@pytest.mark.parametrize("method", METHODS)
def test_apply_aligns_new_images_into_the_learned_frame(method, warped_copies):
    # Fit on 10 copies; 4 *new* copies under fresh warps, aligned by the saved
    # model alone, must land in the frame the fit chose.
    imgs, W = warped_copies("homography", n=14, scale=0.05, seed=6)
    res = create_method(method).fit(imgs[:10], FitContext(warp="homography"))
    new = res.aligner.align(imgs[10:])
    assert new.shape == (4, 3, 3)
    fitted = (W[:10], res.in_from_out_norm)
    assert _distance_to_frame(*fitted, W[10:], torch.eye(3).expand(4, 3, 3)) > 2.0
    assert _distance_to_frame(*fitted, W[10:], new.float().cpu()) < 0.8


@pytest.mark.parametrize("method", ["rasl", "lsc"])
def test_saved_aligner_round_trips(method, tmp_path, warped_copies):
    imgs, _ = warped_copies("affine", n=8, scale=0.05, seed=7)
    res = create_method(method).fit(imgs, FitContext(warp="affine", budget=6))
    res.aligner.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == method and cfg["family"] == "affine"
    loaded = load_aligner(tmp_path / "m", "cpu")
    assert loaded.method == method
    assert torch.allclose(loaded.align(imgs[:3]), res.aligner.align(imgs[:3]), atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        loaded.align(imgs[:2].expand(-1, 3, -1, -1))  # wrong channel count


def test_options_override_defaults_and_unknown_ones_fail(warped_copies):
    imgs, _ = warped_copies("translation", n=6, scale=0.05, seed=8)
    m = create_method("rasl", lam=0.1)
    assert m.config.lam == 0.1
    res = m.fit(imgs, FitContext(warp="translation", options={"levels": [1.0], "max_iters": 3}))
    assert {h["level"] for h in res.history} == {0} and len(res.history) <= 3
    with pytest.raises(ValueError, match="valid:.*levels"):
        create_method("lsc", no_such_option=1)
    with pytest.raises(ValueError, match="unknown option"):
        create_method("tgrasta").fit(imgs, FitContext(warp="translation", options={"bogus": 1}))


@pytest.mark.parametrize("method", METHODS)
def test_progress_and_cooperative_cancel(method, warped_copies):
    imgs, _ = warped_copies("translation", n=6, scale=0.05, seed=9)
    seen = []
    create_method(method).fit(imgs, FitContext(warp="translation", budget=4, progress=seen.append))
    assert seen and all(p.stage == "training" and p.total == 4 for p in seen)
    assert [p.step for p in seen] == sorted(p.step for p in seen)
    calls = []
    with pytest.raises(Cancelled):
        create_method(method).fit(imgs, FitContext(warp="translation", budget=4,
                                                   should_stop=lambda: calls.append(1) or len(calls) > 1))


@pytest.mark.parametrize("method", ["rasl", "tgrasta"])
def test_checkpoint_resume(method, tmp_path, warped_copies):
    imgs, _ = warped_copies("translation", n=6, scale=0.05, seed=10)
    opts = {"levels": [1.0], "outer_tol": 0.0} if method == "rasl" else {"levels": [1.0]}
    first = create_method(method).fit(imgs, FitContext(warp="translation", budget=2, checkpoint_dir=tmp_path,
                                                       options=opts))
    assert (tmp_path / f"{method}_state.safetensors").is_file()
    again = create_method(method).fit(imgs, FitContext(warp="translation", budget=4, checkpoint_dir=tmp_path,
                                                       options=opts))
    assert any("resumed" in n for n in again.notes)
    assert [h["step"] for h in again.history] == [3, 4]
    # A checkpoint of another collection is ignored, not misapplied.
    other = create_method(method).fit(imgs[:5], FitContext(warp="translation", budget=2, checkpoint_dir=tmp_path,
                                                           options=opts))
    assert not any("resumed" in n for n in other.notes)
    assert first.in_from_out_norm.shape == (6, 3, 3)
