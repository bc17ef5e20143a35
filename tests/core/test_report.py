"""``report.html`` (models.report): opened and read back as a browser would parse it.

The page holds its parts (checks, warnings in words, mean/variance before and after, the
training curve, the contact sheet worst residual first), loads nothing from anywhere (every
image a data URI, no script, a Content-Security-Policy that forbids both), escapes what the
user named, and a job of any size costs it a bounded sample of images.
"""
import base64
import io
import json
import time
from html.parser import HTMLParser

import numpy as np
import torch
from PIL import Image

import models.pipeline as P
from models import report as R
from models.sources import open_source


class _Page(HTMLParser):
    """Every start tag with its attributes, the text, and the sections by id."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def _png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _assert_self_contained(page: _Page) -> None:
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    csp = [a for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"] and "img-src data:" in csp[0]["content"]
    for _, attrs in page.tags:
        for k, v in attrs.items():
            assert k != "href" and not (k == "src" and not v.startswith("data:image/png;base64,")), (k, v)
            assert not k.startswith("on"), k  # no event handlers either


# --------------------------------------------------------------------------- the sample


def test_a_small_collection_is_shown_whole_worst_residual_first():
    r = np.array([0.3, 2.0, np.nan, 1.0, 0.1])
    assert R.sample_indices(r).tolist() == [2, 1, 3, 0, 4]  # a non-finite residual counts as worst


def test_a_large_collection_shows_its_worst_then_an_even_spread_down_to_the_best():
    r = np.random.default_rng(0).random(1_000_000)
    idx = R.sample_indices(r, worst=24, spread=24)
    order = np.argsort(-r)
    assert len(idx) == 48 and len(set(idx.tolist())) == 48
    assert idx[:24].tolist() == order[:24].tolist()
    assert (np.diff(r[idx]) <= 0).all()
    assert idx[-1] == order[-1]  # down to the smallest


# --------------------------------------------------------------------------- the page


def _synthetic(names, warnings):
    k = len(names)
    rng = np.random.default_rng(1)
    res = np.sort(rng.random(k))[::-1].astype(np.float32)
    sample = R.Sample(index=np.arange(k), names=names, inputs=rng.integers(0, 255, (k, 20, 30), dtype=np.uint8),
                      aligned=rng.integers(0, 255, (k, 20, 30), dtype=np.uint8), residual=res,
                      outlier=np.array([True] + [False] * (k - 1)), content_kept=np.full(k, 0.5, np.float32),
                      cropped=np.array([False, True] + [False] * (k - 2)), touches_edge=None)
    metrics = {"method": "dprc", "warp": "homography", "device": "cpu", "n_images": 1000, "apsnr_before": 11.2,
               "apsnr_after": 17.9, "residual_summary": {"median": 12.0, "p95": 30.0, "max": 41.0, "n_outliers": 3},
               "framing_summary": {"content_kept_median": 0.98, "content_kept_p10": 0.9, "area_scale_median": 1.02,
                                   "n_cropped": 4, "n_lost": 2, "n_touching_edge": None},
               "consistency_summary": {"ratio": 0.3, "moved_median_px": 0.4, "probe_median_px": 1.3},
               "warnings": warnings, "notes": ["schedule: 64 images a step"], "seconds": 12.5,
               "history": [{"step": s, "loss": 1.0 / s, "D": 0.5 / s, "C": None} for s in range(1, 30)]
               + [{"step": s, "loss": 0.8 / s, "D": 0.4 / s, "C": None} for s in range(1, 10)]}
    return metrics, sample


def test_the_page_holds_its_parts_loads_nothing_and_escapes_names():
    hostile = '<script>alert("x")</script>.png'
    metrics, sample = _synthetic(["a.png", hostile, "c.png"], ["the alignment crops into the objects"])
    stats = {n: R.png_data_uri(np.full((8, 8), i * 60, np.uint8)) for i, n in enumerate(R.STAT_IMAGES)}
    stats = {n: base64.b64decode(u.split(",", 1)[1]) for n, u in stats.items()}
    page = _Page(R.render_report(metrics, stats, sample))
    _assert_self_contained(page)
    assert {a["id"] for a in page.all("section")} == {"checks", "warnings", "notes", "statistics", "training", "sheet"}
    assert any(a.get("title") == hostile for a in page.all("span"))  # shown as text, never as markup
    assert 'alert("x")</script>.png' in page.words
    assert "the alignment crops into the objects" in page.words
    assert "11.2 dB before, 17.9 dB after" in page.words
    assert "4 images keep less than the target, 2 lost their object" in page.words
    # the mean/variance images, in order, are the bytes given
    figs = [a for a in page.all("img") if a.get("alt") in R.STAT_IMAGES]
    assert [a["alt"] for a in figs] == list(R.STAT_IMAGES)
    assert all(np.asarray(_png(a["src"])).max() == i * 60 for i, a in enumerate(figs))
    # the training curve: one panel per recorded key (C has no values), the re-fit a second line
    svgs = page.all("svg", "curve")
    assert [a["data-key"] for a in svgs] == ["loss", "D"]
    assert len(page.all("polyline")) == 4
    # the contact sheet: input and aligned for every sampled image, in the sample's order, with flags
    cards = page.all("figure", "card")
    assert [int(a["data-index"]) for a in cards] == [0, 1, 2]
    imgs = [a for a in page.all("img", "px") if a.get("alt") in ("input", "aligned")]
    assert len(imgs) == 6 and all(_png(a["src"]).size == (30, 20) for a in imgs)
    assert np.array_equal(np.asarray(_png(imgs[3]["src"])), sample.aligned[1])
    assert "outlier" in page.words and "cropped: keeps 0.50 of its object" in page.words
    assert "3 of 1,000 images" in page.words  # the sample is said to be a sample


def test_no_warnings_and_no_training_are_said_plainly():
    metrics, sample = _synthetic(["a.png", "b.png"], [])
    metrics["history"] = []
    page = _Page(R.render_report(metrics, {}, sample))
    assert "No warnings" in page.words and "No training history" in page.words


# --------------------------------------------------------------------------- written by jobs


def _check_job_report(out):
    m = json.loads((out / "metrics.json").read_text())
    per = np.load(out / "per_image.npy")
    page = _Page((out / "report.html").read_text())
    _assert_self_contained(page)
    cards = page.all("figure", "card")
    assert [int(a["data-index"]) for a in cards] == np.argsort(-per["residual"], kind="stable").tolist()
    for a in page.all("img"):
        if a.get("alt") in R.STAT_IMAGES:
            assert base64.b64decode(a["src"].split(",", 1)[1]) == (out / f"{a['alt']}.png").read_bytes()
    assert all(w in page.words for w in m["warnings"])
    return m, page


def test_congeal_align_writes_the_report_beside_its_outputs(tmp_path, digits_npy):
    opts = P.AlignOptions(device="cpu", method_options={"steps": 4, "batch_size": 16, "reframe": False})
    P.align_collection(digits_npy, tmp_path / "out", opts)
    m, page = _check_job_report(tmp_path / "out")
    assert len(page.all("figure", "card")) == 18
    assert [a["data-key"] for a in page.all("svg", "curve")] == ["loss", "D", "C"] and len(m["history"]) >= 2


def test_apply_writes_a_report_too(tmp_path, digits_npy, untrained_model):
    P.apply_model(untrained_model(tmp_path / "model", 0.45), digits_npy, tmp_path / "out", device="cpu")
    _, page = _check_job_report(tmp_path / "out")
    assert "No training history" in page.words


class _CountingRows:
    """A read-only (N, C, H, W) array that counts the rows read through it."""

    def __init__(self, a):
        self.a, self.rows = a, 0
        self.shape, self.dtype = a.shape, a.dtype

    def __getitem__(self, key):
        out = self.a[key]
        self.rows += len(out) if out.ndim == self.a.ndim else 1
        return out


def test_a_large_job_costs_the_report_a_bounded_sample(tmp_path):
    n = 300_000
    rng = np.random.default_rng(2)
    np.save(tmp_path / "big.npy", rng.integers(0, 255, (n, 8, 8), dtype=np.uint8))
    src = open_source(tmp_path / "big.npy")
    x = _CountingRows(np.load(tmp_path / "big.npy", mmap_mode="r")[:, None])
    work = P._Work(x=x, bg=np.zeros((n, 1), np.float32), size=(8, 8))
    per = np.zeros(n, dtype=P.per_image_dtype(1))
    per["residual"] = rng.random(n)
    per["touches_edge"] = -1
    t = time.perf_counter()
    sample = P._report_sample(src, work, torch.eye(3).expand(n, 3, 3), per)
    R.write_report(tmp_path, {"n_images": n, "warnings": []}, sample)
    assert time.perf_counter() - t < 20
    assert x.rows == len(sample) == R.WORST + R.SPREAD
    assert np.array_equal(sample.inputs, sample.aligned)  # identity warps
    page = _Page((tmp_path / "report.html").read_text())
    assert len(page.all("figure", "card")) == 48 and "48 of 300,000 images" in page.words
