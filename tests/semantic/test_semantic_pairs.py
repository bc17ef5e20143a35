"""The semantic method as a pair method: dense maps as data (models/pairwise/dense.py) against the
torch geometry, the pipeline's convention in original pixels with a model of known output, a job
that trains on its images and leaves a reusable model, and ``congeal pair --method semantic``."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from congeal.cli import main as cli
from models.imageio import InputError
from models.pairwise import dense as DP
from models.pairwise.pipeline import PairInput, PairOptions, align_pairs, run_pairs, warp_source
from models.semantic import geometry as SG
from models.semantic.method import SemanticPairMethod
from models.semantic.model import SemanticConfig, SemanticModel, save_model

D = torch.float64
TINY = dict(synthetic_steps=2, weak_steps=1, batch=4)


def _warp_dict(theta, dst, size):
    """The dense map of normalised (theta, dst) on an unresized ``size`` image pair, in pixels."""
    H, W = size
    n = np.array([[2 / (W - 1), 0, -1], [0, 2 / (H - 1), -1], [0, 0, 1.0]])
    post = np.linalg.inv(n) @ np.vstack([theta, [0, 0, 1]])
    return {"type": DP.DENSE_TYPE, "pre": n.tolist(), "tps_grid": 3, "tps_dst": dst.tolist(), "post": post.tolist()}


def _reference(theta, dst, size, pts):
    ctrl = SG.tps_control_points(3, like=torch.zeros((), dtype=D))
    p = SG.norm_from_pixel_points(torch.as_tensor(pts, dtype=D)[None], size)
    q = SG.affine_points(torch.as_tensor(theta, dtype=D)[None], SG.tps_points(ctrl, torch.as_tensor(dst)[None], p))
    return SG.pixel_from_norm_points(q, size)[0].numpy()


@pytest.fixture
def known():
    g = np.random.default_rng(0)
    theta = np.array([[1.05, 0.1, 0.05], [-0.08, 0.95, -0.1]])
    ctrl = SG.tps_control_points(3, like=torch.zeros((), dtype=D)).numpy()
    dst = ctrl + g.normal(0, 0.05, ctrl.shape)
    return theta, dst


def test_dense_map_matches_the_torch_geometry_and_inverts(known):
    theta, dst = known
    size = (30, 40)
    w = _warp_dict(theta, dst, size)
    pts = np.random.default_rng(1).uniform(0, 29, (50, 2))
    there = DP.dense_target_to_source(w, pts)
    assert np.allclose(there, _reference(theta, dst, size, pts), atol=1e-9)
    assert np.allclose(DP.dense_source_to_target(w, there), pts, atol=1e-3)
    flow = DP.dense_flow(w, size)
    assert flow.shape == (30, 40, 2) and np.allclose(flow[7, 11], DP.dense_target_to_source(w, [[11, 7]])[0], atol=1e-4)
    assert np.isnan(DP.dense_source_to_target(w, [[1e6, 1e6]])).all()  # not reached by the map
    with pytest.raises(ValueError, match="tps_grid"):
        DP.dense_target_to_source({**w, "tps_dst": [[0, 0]]}, pts)


def _fixed_model(theta, dst, size=16):
    """A model whose heads answer ``theta`` and ``dst`` whatever the images (zero weights, set biases)."""
    m = SemanticModel(SemanticConfig(size=size, channels=(4, 4), strides=(2, 2), head_channels=(4, 4)))
    ctrl = m.ctrl(torch.zeros(()))
    with torch.no_grad():
        m.affine_head.out.bias.copy_(torch.as_tensor(theta - np.eye(2, 3)).reshape(-1).float())
        m.tps_head.out.bias.copy_((torch.as_tensor(dst).float() - ctrl).reshape(-1))
    return m.eval()


def test_pipeline_convention_in_original_pixels(known, tmp_path):
    theta, dst = known
    save_model(_fixed_model(theta, dst), tmp_path / "m")
    g = np.random.default_rng(2)
    src, tgt = g.uniform(0, 1, (30, 40)), g.uniform(0, 1, (30, 40))
    r = align_pairs([PairInput(src, tgt, "p")], PairOptions(method="semantic", device="cpu", max_side=64,
                                                              method_options={"model": str(tmp_path / "m")}))[0]
    pts = g.uniform(0, 29, (20, 2))
    assert r.warp is not None
    assert np.allclose(r.target_to_source(pts), _reference(theta, dst, (30, 40), pts), atol=1e-4)
    # the matrix is the affine stage alone: the map with the spline left out
    assert np.allclose(r.matrix / r.matrix[2, 2], np.array(r.warp["post"]) @ np.array(r.warp["pre"]), atol=1e-6)
    assert np.allclose(r.source_to_target(r.target_to_source(pts)), pts, atol=1e-2)
    # the warped source is the source read at the flow
    w = warp_source(src, r.matrix, r.target_size, flow=r.flow())
    f = r.flow()
    x0, y0 = np.floor(f[15, 20]).astype(int)
    fx, fy = f[15, 20] - [x0, y0]
    ref = (src[y0, x0] * (1 - fx) * (1 - fy) + src[y0, x0 + 1] * fx * (1 - fy) + src[y0 + 1, x0] * (1 - fx) * fy
           + src[y0 + 1, x0 + 1] * fx * fy)
    assert w[15, 20] == pytest.approx(ref, abs=1e-4)


def test_job_trains_on_its_images_and_leaves_a_reusable_model(tmp_path, stroke_images):
    ims = stroke_images()
    specs = []
    for i, a in enumerate(ims):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    specs = [(str(tmp_path / "0.png"), str(tmp_path / "1.png"), "a"), (str(tmp_path / "2.png"), str(tmp_path / "3.png"), "b")]
    pts = [{"target": [[5, 6], [12, 12]], "source": [[8, 8]]}] * 2
    opts = PairOptions(method="semantic", device="cpu", max_side=32, min_confidence=0,
                       method_options={**TINY, "size": 16})
    rep = run_pairs(specs, tmp_path / "out", opts, points=pts)
    assert rep["n_pairs"] == 2 and rep["model"] == "model"
    doc = json.loads((tmp_path / "out" / "pairs.json").read_text())
    e = doc["pairs"][0]
    assert e["warp"]["type"] == DP.DENSE_TYPE and len(e["points"]["target_in_source"]) == 2
    assert set(e["files"]) == {"warped", "overlay", "checkerboard", "flow"}
    assert np.load(tmp_path / "out" / e["files"]["flow"]).shape == (24, 24, 2)
    cfg = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert cfg["method"] == "semantic" and cfg["size"] == 16 and cfg["train"]["synthetic_steps"] == 2
    # the model again: the same maps, without training
    again = align_pairs([PairInput(ims[0], ims[1], "a")], PairOptions(
        method="semantic", device="cpu", max_side=32, method_options={"model": str(tmp_path / "out" / "model")}))[0]
    assert np.allclose(again.warp["tps_dst"], e["warp"]["tps_dst"], atol=1e-5)
    assert np.allclose(again.warp["post"], e["warp"]["post"], atol=1e-5)


def test_bad_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown option"):
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic", method_options={"steps": 3}))
    with pytest.raises(InputError, match="not a semantic model"):
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic", method_options={"model": str(tmp_path)}))
    with pytest.raises(InputError, match="no such feature weights file"):
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic",
                                                                 method_options={"features": str(tmp_path / "f")}))
    with pytest.raises(InputError, match="batch >= 2"):
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic", method_options={"batch": 1}))
    with pytest.raises(InputError, match="weak_synthetic"):
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic",
                                                                 method_options={"weak_synthetic": "x"}))
    with pytest.raises(InputError, match="as it is"):
        SemanticPairMethod  # noqa: B018  (the class is importable)
        run_pairs([("a", "b", "")], tmp_path / "o", PairOptions(method="semantic",
                                                                 method_options={"model": "x", "weak_steps": 1}))


def test_operator_features_train_into_a_model(tmp_path, stroke_images):
    from models.semantic.model import ConvFeatures
    torch.manual_seed(0)
    ConvFeatures(1, (4, 4), (2, 2)).save_safetensors(tmp_path / "f.safetensors")
    m = SemanticPairMethod(features=str(tmp_path / "f.safetensors"), size=16, freeze_features=True, **TINY)
    before = {k: v.clone() for k, v in SemanticModel.from_feature_file(tmp_path / "f.safetensors").features.state_dict().items()}
    assert m.fit_collection(stroke_images(), torch.device("cpu"))
    assert m.model.cfg.features == str(tmp_path / "f.safetensors") and m.model.cfg.channels == (4, 4)
    for k, v in m.model.features.state_dict().items():
        assert torch.equal(v, before[k])  # frozen: the operator's features kept


def test_cli_pair_semantic(tmp_path, stroke_images):
    for i, a in enumerate(stroke_images(4)):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    # the first call in a fresh process, as a user runs it; the others in this one (faster)
    r = subprocess.run([sys.executable, "-m", "congeal", "pair", tmp_path / "0.png", tmp_path / "1.png", "--out", out,
                        "--method", "semantic", "--option", "synthetic_steps=2", "--option", "weak_steps=1",
                        "--option", "batch=2", "--option", "size=16", "--point", "5,5", "--source-point", "6,6",
                        "--min-confidence", "0", "--quiet", "--device", "cpu"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "pairs.json").read_text())
    assert doc["model"] == "model" and (out / "model" / "semantic.safetensors").is_file()
    assert doc["pairs"][0]["points"]["target_in_source"][0] is not None
    assert cli([str(a) for a in ("pair", tmp_path / "0.png", tmp_path / "1.png", "--out", tmp_path / "o2", "--method",
                                 "semantic", "--option", f"model={out / 'model'}", "--quiet", "--device", "cpu")]) == 0
    assert "model" not in json.loads((tmp_path / "o2" / "pairs.json").read_text())
    # a collection: the pairs name its images; the method trains on all of them
    col = tmp_path / "col"
    col.mkdir()
    for i, a in enumerate(stroke_images(5, seed=3)):
        Image.fromarray(a).save(col / f"d{i}.png")
    (tmp_path / "pairs.csv").write_text("d0.png,d1.png,x\n")
    assert cli([str(a) for a in ("pair", "--pairs", tmp_path / "pairs.csv", "--collection", col, "--out", tmp_path / "o3",
                                 "--method", "semantic", "--option", "synthetic_steps=1", "--option", "weak_steps=1",
                                 "--option", "batch=2", "--option", "size=16", "--quiet", "--device", "cpu")]) == 0
    assert json.loads((tmp_path / "o3" / "pairs.json").read_text())["pairs"][0]["source_name"] == "d0.png"


def test_pipeline_convention_through_resizing_and_sizes(known, tmp_path):
    """Source and target of different sizes and channels, both resized for the estimate: the map in
    original pixels goes through each image's resize (models.geometry.original_from_resized)."""
    from models import geometry as G
    theta, dst = known
    save_model(_fixed_model(theta, dst), tmp_path / "m")
    g = np.random.default_rng(4)
    src, tgt = g.uniform(0, 1, (60, 90, 3)), g.uniform(0, 1, (50, 40))
    r = align_pairs([PairInput(src, tgt, "p")], PairOptions(method="semantic", device="cpu", max_side=30,
                                                              method_options={"model": str(tmp_path / "m")}))[0]
    ss, ts = (20, 30), (30, 24)  # working sizes: longer side 30
    rs = G.original_from_resized([(60, 90)], ss)[0].numpy()
    rt = G.original_from_resized([(50, 40)], ts)[0].numpy()
    pts = g.uniform(0, 39, (20, 2))
    p_work = (np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(rt).T)[:, :2]  # target working pixels
    # the torch geometry by hand: normalised in the target's working frame, out in the source's
    ctrl = SG.tps_control_points(3, like=torch.zeros((), dtype=D))
    n = SG.norm_from_pixel_points(torch.as_tensor(p_work)[None], ts)
    m = SG.affine_points(torch.as_tensor(theta)[None], SG.tps_points(ctrl, torch.as_tensor(dst)[None], n))
    q_work = SG.pixel_from_norm_points(m, ss)[0].numpy()
    expected = (np.c_[q_work, np.ones(len(q_work))] @ rs.T)[:, :2]
    assert np.allclose(r.target_to_source(pts), expected, atol=1e-4)
    assert r.flow().shape == (50, 40, 2)
    w = warp_source(src, r.matrix, r.target_size, flow=r.flow())
    assert w.shape == (50, 40, 3)
