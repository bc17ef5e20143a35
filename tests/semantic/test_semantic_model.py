"""models/semantic/model.py and train.py: the normalised correlation on hand-made features, the
soft-inlier count on a known correspondence, identity-initialised heads, operator feature files,
save/load, and a training run's bookkeeping."""
from __future__ import annotations

import json
import math

import pytest
import torch

from models.methods import Cancelled
from models.semantic import geometry as SG
from models.semantic.model import (ConvFeatures, SemanticConfig, SemanticModel, feature_cell_points, load_model,
                                   normalised_correlation, save_model, soft_inlier_count)
from models.semantic.train import TrainConfig, fit_semantic

TINY = SemanticConfig(size=16, channels=(4, 4), strides=(2, 2), head_channels=(4, 4), tps_grid=2)


def _onehot(h, w, perm=None):
    """``(1, h * w, h, w)`` features: cell ``c`` is the unit vector ``perm[c]``."""
    n = h * w
    perm = torch.arange(n) if perm is None else perm
    f = torch.zeros(1, n, n)
    f[0, perm, torch.arange(n)] = 1
    return f.reshape(1, n, h, w)


def test_correlation_exact_on_unit_features():
    fs = _onehot(2, 2)
    s = normalised_correlation(fs, fs)
    assert s.shape == (1, 4, 2, 2)
    assert torch.allclose(s.reshape(4, 4), torch.eye(4), atol=1e-5)


def test_correlation_down_weighs_ambiguous_matches():
    # source cells 0 and 1 carry the same feature; target cell 0 matches both, target cell 1 only cell 2.
    fs = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, -1.0]]).T.reshape(1, 2, 2, 2)
    ft = torch.tensor([[1.0, 0], [0, 1.0]]).T.reshape(1, 2, 1, 2)
    s = normalised_correlation(fs, ft).reshape(4, 2)
    assert s[0, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert s[1, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert s[2, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert s[3, 1].item() == 0  # an opposite feature is no match


def test_soft_inlier_count_scores_the_true_map():
    h = 6
    # target cell (k, l) matches source cell (k, l + 1): the map is a shift of one cell in x.
    n = h * h
    perm = torch.arange(n).reshape(h, h).roll(-1, dims=1).reshape(-1)
    corr = normalised_correlation(_onehot(h, h), _onehot(h, h, perm))
    cells = feature_cell_points(h, h, 1, like=corr)
    step = 2 / (h - 1)
    shift = torch.tensor([step, 0.0])
    inside = (cells[0, :, 0] + step <= 1).float().mean()  # the last column has no partner
    assert soft_inlier_count(corr, cells + shift, radius=0).item() == pytest.approx(inside.item(), abs=1e-5)
    assert soft_inlier_count(corr, cells, radius=0).item() == pytest.approx(0, abs=1e-6)
    assert soft_inlier_count(corr, cells, radius=1).item() == pytest.approx(inside.item(), abs=1e-5)
    # gradient ascent on a translation recovers the shift from half a cell away
    t = torch.tensor([0.5 * step, 0.3 * step], requires_grad=True)
    opt = torch.optim.SGD([t], lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.97)  # the count is piecewise linear: steps must shrink
    for _ in range(200):
        opt.zero_grad()
        (-soft_inlier_count(corr, cells + t, radius=0)).backward()
        opt.step()
        sched.step()
    assert torch.allclose(t.detach(), shift, atol=0.05 * step)


def test_heads_start_at_the_identity():
    m = SemanticModel(TINY)
    x = torch.rand(3, 1, 20, 20)
    out = m(x, torch.rand(3, 1, 20, 20))
    assert torch.equal(out.theta, SG.identity_affine(3, like=out.theta))
    assert torch.equal(out.tps_dst, m.ctrl(x).expand(3, -1, -1))
    assert torch.allclose(m.flow(out, (5, 7)), SG.base_grid((5, 7), like=x).expand(3, -1, -1, -1), atol=1e-6)


def test_feature_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = ConvFeatures(3, (5, 6), (2, 1))
    path = tmp_path / "feat.safetensors"
    net.save_safetensors(path)
    m = SemanticModel.from_feature_file(path, size=16, head_channels=(4, 4), tps_grid=2)
    assert m.cfg.channels == (5, 6) and m.cfg.strides == (2, 1) and m.cfg.in_channels == 3
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(m.features(x), net(x))
    with pytest.raises(ValueError, match="no such feature weights file"):
        SemanticModel.from_feature_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a header")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SemanticModel.from_feature_file(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"conv0.weight": torch.zeros(4, 1, 3, 3), "conv0.bias": torch.zeros(4)}, str(tmp_path / "ns.safetensors"))
    with pytest.raises(ValueError, match="strides"):
        SemanticModel.from_feature_file(tmp_path / "ns.safetensors")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = SemanticModel(TINY)
    for p in m.parameters():
        p.data.normal_(0, 0.05)  # the heads away from zero, so the round trip is seen
    m.eval()
    save_model(m, tmp_path / "m", {"train": {"steps": 3}})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == "semantic" and cfg["tps_grid"] == 2 and cfg["train"] == {"steps": 3}
    m2 = load_model(tmp_path / "m")
    s, t = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    a, b = m(s, t), m2(s, t)
    assert torch.allclose(a.theta, b.theta) and torch.allclose(a.tps_dst, b.tps_dst)
    assert not torch.allclose(a.theta, SG.identity_affine(2, like=a.theta))
    with pytest.raises(ValueError, match="not a semantic model"):
        load_model(tmp_path)


def test_fit_runs_both_stages_and_stops():
    x = torch.rand(6, 1, 20, 20)
    m, rep = fit_semantic(x, TINY, TrainConfig(synthetic_steps=2, weak_steps=2, batch=4))
    assert [h["stage"] for h in rep.history] == ["weakly supervised"]  # logged at the last step
    assert not m.training
    with pytest.raises(Cancelled):
        fit_semantic(x, TINY, TrainConfig(synthetic_steps=2, weak_steps=0, batch=4), should_stop=lambda: True)
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_semantic(x[:1], TINY)
