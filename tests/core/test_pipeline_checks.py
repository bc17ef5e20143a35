"""`align_collection` and `apply_model` check every precondition before any work.

Each bad job below must fail with a message naming the problem, having reported no progress at
all (nothing read, nothing resized, no step trained) and written nothing. A budget of 10,000
epochs makes any check that ran after training show as a test that does not finish.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.imageio import InputError
from models.pipeline import AlignOptions, align_collection, apply_model

SLOW = 10_000  # epochs: a check that happened after training would take hours
pytestmark = pytest.mark.timeout(60)  # ... and fail here within a minute


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def _nonempty(tmp_path):
    o = tmp_path / "out"
    o.mkdir()
    (o / "keep.txt").write_text("precious")
    return o


def _a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("a file")
    return f


BAD_JOBS = [
    ("non-empty out", _nonempty, {}, InputError, "not empty"),
    ("out is a file", _a_file, {}, InputError, "not a folder"),
    ("unknown method", None, {"method": "nope"}, ValueError, "unknown method 'nope'"),
    ("unknown warp", None, {"warp": "spline"}, ValueError, "unknown warp family 'spline'"),
    ("unknown option", None, {"method_options": {"learning_rate": 1}}, ValueError, "learning_rate"),
    ("bad option value", None, {"method_options": {"passes": 0}}, ValueError, "passes=0"),
    ("baseline option", None, {"method": "rasl", "method_options": {"passes": 2}}, ValueError, "passes"),
    ("bad aligned mode", None, {"aligned": "jpeg"}, InputError, "aligned='jpeg'"),
    ("no such device", None, {"device": "gpu"}, InputError, "--device gpu"),
    ("zero gpus", None, {"gpus": 0}, InputError, "gpus=0"),
    ("baseline over gpus", None, {"method": "rasl", "gpus": 2}, InputError, "only dprc"),
]


@pytest.mark.parametrize("what,make_out,opts,exc,msg", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_a_bad_job_fails_before_reading_anything(tmp_path, images, what, make_out, opts, exc, msg):
    out = make_out(tmp_path) if make_out else tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    seen = []
    with pytest.raises(exc, match=msg.replace("(", r"\(")):
        align_collection(images, out, AlignOptions(**{"budget": SLOW, "device": "cpu", **opts}),
                         progress=seen.append)
    assert seen == []  # not even "loading"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside --out either
    if make_out is _nonempty:
        assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_fails_at_once(tmp_path, images):
    seen = []
    with pytest.raises(InputError, match="CUDA is not available"):
        align_collection(images, tmp_path / "out", AlignOptions(budget=SLOW, device="cuda"), progress=seen.append)
    assert seen == []


def test_input_and_reference_are_checked_before_training(tmp_path, images):
    seen = []
    with pytest.raises(InputError, match="no such file or folder"):
        align_collection(tmp_path / "nope", tmp_path / "out", AlignOptions(budget=SLOW, device="cpu"),
                         progress=seen.append)
    with pytest.raises(InputError, match="reference 'missing.png'"):
        align_collection(images, tmp_path / "out", AlignOptions(budget=SLOW, device="cpu", reference="missing.png"),
                         progress=seen.append)
    assert {p.stage for p in seen} <= {"loading"} and not (tmp_path / "out").exists()


def test_a_distributed_job_is_checked_before_it_launches(tmp_path, images):
    # gpus > 1 starts torchrun (seconds); a bad output folder or reference must not get that far.
    out = _nonempty(tmp_path)
    with pytest.raises(InputError, match="not empty"):
        align_collection(images, out, AlignOptions(budget=SLOW, device="cpu", gpus=2))
    with pytest.raises(InputError, match="reference 'missing.png'"):
        align_collection(images, tmp_path / "o2", AlignOptions(budget=SLOW, device="cpu", gpus=2,
                                                                reference="missing.png"))


def test_apply_checks_model_output_and_input_before_reading(tmp_path, images):
    seen = []
    with pytest.raises(InputError, match="nope: no such folder"):
        apply_model(tmp_path / "nope", images, tmp_path / "o", device="cpu", progress=seen.append)
    with pytest.raises(InputError, match="not a trained model folder"):
        apply_model(images, images, tmp_path / "o", device="cpu", progress=seen.append)
    model = tmp_path / "model"
    model.mkdir()
    (model / "pipeline.json").write_text('{"working_size": [16, 16], "channels": 1, "method": "dprc"}')
    with pytest.raises(InputError, match="not empty"):
        apply_model(model, images, _nonempty(tmp_path), device="cpu", progress=seen.append)
    with pytest.raises(InputError, match="no such file or folder"):
        apply_model(model, tmp_path / "missing", tmp_path / "o", device="cpu", progress=seen.append)
    with pytest.raises(InputError, match="aligned='gif'"):
        apply_model(model, images, tmp_path / "o", device="cpu", aligned="gif", progress=seen.append)
    assert seen == [] and not (tmp_path / "o").exists()
