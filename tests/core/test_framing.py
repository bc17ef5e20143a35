"""Ground-truth-free framing checks (content kept, area scale) and the warnings they raise."""
import json

import numpy as np
import pytest
import torch

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


def test_warnings_name_the_degenerate_mode():
    from models.pipeline import _framing_warnings

    assert _framing_warnings(torch.tensor([1.0, 0.95]), torch.tensor([1.0, 1.2])) == []
    (w,) = _framing_warnings(torch.tensor([0.1, 0.2, 0.9]), torch.ones(3))
    assert "crops into the objects" in w and "0.20" in w and "moment_weight" in w
    (w,) = _framing_warnings(torch.ones(3), torch.full((3,), 6.0))
    assert "shrinks" in w


def test_apply_with_a_cropping_aligner_warns(tmp_path):
    """A real (untrained) DPRC aligner whose moment reference is huge zooms 2.5x into every digit."""
    from models.data import mnist_digits
    from models.dprc import DPRCAligner
    from models.nets import DeSTNet, DeSTNetConfig, PRESETS
    from models.pipeline import apply_model

    net = DeSTNet(DeSTNetConfig(in_channels=1, image_size=(28, 28), warp="homography", bound=0.6,
                                **PRESETS["small"]["destnet"]))
    aligner = DPRCAligner(net, "moments", torch.zeros(2), torch.tensor(10.0))
    model = tmp_path / "model"
    aligner.save(model)
    (model / "pipeline.json").write_text(json.dumps({"working_size": [28, 28], "channels": 1,
                                                     "warp": "homography", "method": "dprc", "max_side": 28}))
    x = (mnist_digits(3, 6).numpy()[:, 0] * 255).astype("uint8")
    np.save(tmp_path / "d.npy", x)
    rep = apply_model(model, tmp_path / "d.npy", tmp_path / "out", device="cpu")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["framing_summary"]["content_kept_median"] < 0.85 and m["framing_summary"]["n_cropped"] >= 1
    assert m["framing_summary"]["area_scale_median"] == pytest.approx(0.16, rel=0.05)  # (1 / 2.5)^2
    assert rep.warnings and rep.warnings == m["warnings"] and "crops into the objects" in m["warnings"][0]
    assert all(0 <= e["content_kept"] <= 1.5 for e in m["per_image"])
