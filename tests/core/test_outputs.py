"""Job outputs at scale: array files beside the JSON, the same numbers however they are streamed."""
import json

import numpy as np
import pytest

import models.pipeline as P


def _names(out):
    text = (out / "names.txt").read_bytes()
    idx = np.load(out / "names.idx.npy")
    return [text[a:b].decode().rstrip("\n") for a, b in zip(idx[:-1], idx[1:])]


def test_a_small_job_writes_arrays_that_agree_with_its_json(tmp_path, digits_npy, untrained_model):
    model = untrained_model(tmp_path / "model", 0.45)
    P.apply_model(model, digits_npy, tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    t = json.loads((out / "transforms.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    T = np.load(out / "transforms.npy")
    per = np.load(out / "per_image.npy", allow_pickle=False)
    assert T.shape == (18, 3, 3) and np.allclose(T, [im["matrix"] for im in t["images"]])
    assert _names(out) == [im["name"] for im in t["images"]] == [e["name"] for e in m["per_image"]]
    assert np.allclose(per["residual"], [e["residual"] for e in m["per_image"]], atol=1e-4)
    assert np.allclose(per["content_kept"], [e["content_kept"] for e in m["per_image"]], atol=1e-4)
    assert np.allclose(per["consistency_px"], [e["consistency_px"] for e in m["per_image"]], atol=1e-4)
    assert np.allclose(per["fill"][:, 0], [im["fill"][0] for im in t["images"]], atol=1e-3)
    assert (per["input_size"] == [28, 28]).all()
    assert all((out / im["aligned_file"]).is_file() for im in t["images"])


def test_streamed_in_small_chunks_and_from_a_scratch_file_the_outputs_are_the_same(
        tmp_path, digits_npy, untrained_model, monkeypatch):
    """The outputs are computed a chunk at a time (sums for the mean and variance, a second pass
    for each image's residual to the mean), and a large working set lives in a scratch file: neither
    may change a number. Forced here on 18 images: chunks of 5, a 1-byte memory budget, and the
    large-job layout (no per-image JSON, no aligned images unless asked)."""
    model = untrained_model(tmp_path / "model", 0.45)
    P.apply_model(model, digits_npy, tmp_path / "ref", device="cpu")
    monkeypatch.setattr(P, "_chunk_for", lambda *a, **k: 5)
    monkeypatch.setattr(P, "HOST_WORK_BYTES", 1)
    monkeypatch.setattr(P, "SMALL_JOB_MAX", 10)
    P.apply_model(model, digits_npy, tmp_path / "big", device="cpu", aligned="npy")
    ref, big = tmp_path / "ref", tmp_path / "big"
    assert not list(tmp_path.glob(".congeal-work-*")), "the scratch working set is removed after the job"
    assert np.allclose(np.load(big / "transforms.npy"), np.load(ref / "transforms.npy"))
    a, b = np.load(ref / "per_image.npy"), np.load(big / "per_image.npy")
    for f in ("residual", "content_kept", "area_scale", "edge_contact", "touches_edge", "outlier"):
        assert np.allclose(a[f].astype(float), b[f].astype(float), atol=1e-5), f
    mr, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, big))
    assert mb["apsnr_after"] == pytest.approx(mr["apsnr_after"], abs=1e-3)
    assert mb["apsnr_before"] == pytest.approx(mr["apsnr_before"], abs=1e-3)
    assert mb["residual_summary"] == pytest.approx(mr["residual_summary"], abs=1e-4)
    assert "per_image" not in mb and "images" not in json.loads((big / "transforms.json").read_text())
    from PIL import Image

    shard = np.load(big / "aligned" / "shard-00000.npy")
    names = json.loads((ref / "transforms.json").read_text())["images"]
    assert shard.shape == (18, 28, 28)
    assert all((np.asarray(Image.open(ref / im["aligned_file"])) == shard[i]).all() for i, im in enumerate(names))
    for name in ("mean_after.png", "var_after.png"):
        assert (np.asarray(Image.open(ref / name)).astype(int) - np.asarray(Image.open(big / name))).__abs__().max() <= 1


def test_metrics_say_where_a_job_spent_its_time(tmp_path, digits_npy):
    """``stage_seconds``: the job's stages in order, each measured once; they account for the job's
    time (what is left between them is saving the model), and the fit's own stages for the fit
    (``fit_setup.networks`` and the like break a stage down)."""
    P.align_collection(digits_npy, tmp_path / "out", P.AlignOptions(device="cpu", method_options={
        "steps": 2, "preset": "small", "reframe": 0}))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    st = m["stage_seconds"]
    top = ["opening", "reading", "to_device", "fit", "writing"]
    assert [k for k in st if not k.startswith("fit_")] == top
    assert all(v >= 0 for v in st.values())
    assert 0.5 * m["seconds"] <= sum(st[k] for k in top) <= m["seconds"] + 0.01
    inner = sum(v for k, v in st.items() if k.startswith("fit_") and "." not in k)  # dotted: a stage's parts
    assert {"fit_setup", "fit_training", "fit_aligning"} <= set(st) and inner <= st["fit"] + 0.01
    parts = [v for k, v in st.items() if k.startswith("fit_setup.")]
    assert len(parts) == 2 and sum(parts) <= st["fit_setup"] + 0.01
