"""The JSON and image endpoints the web page reads (``/jobs/{id}/gallery``, ``/summary``,
``/inputs/{name}``, ``/models/{id}/download``), checked against exact answers on job outputs the
test writes itself (as ``test_service_per_image.py`` does), in embedded mode with API keys on.
The page itself is driven by a real browser in ``test_service_web.py``."""
from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.report import checks
from service.app import create_app
from service.contracts import JobKind, JobRecord, JobStatus, Settings, new_job_id, open_store
from service.inputs import InputUnavailable, input_png
from service_testlib import API_KEYS, auth, png_bytes
from test_service_per_image import write_contract_output

N = 5_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tmp_path_factory.mktemp("ui-endpoints")
    s = Settings(redis_url=None, data_dir=data, api_keys=API_KEYS, per_image_page_size_max=1000)
    store = open_store(s)
    with TestClient(create_app(s), headers=auth()) as c:
        yield c, store, data
    store.close()


def _job(store, data, status=JobStatus.succeeded, archive=None, result=None):
    rec = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice", status=status, finished_at=time.time(),
                    n_inputs=3, input_archive=archive, result=result or {"n_images": 3})
    store.insert(rec)
    return rec.id, data / "jobs" / rec.id


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_gallery_ranks_every_image_by_residual_largest_first(setup):
    c, store, data = setup
    jid, d = _job(store, data)
    arrays = write_contract_output(d / "output", N)
    arrays["per"]["residual"][[11, 4000]] = np.nan  # no residual: shown first, in index order
    np.save(d / "output" / "per_image.npy", arrays["per"])
    want = np.argsort(-np.nan_to_num(arrays["per"]["residual"].astype(np.float64), nan=np.inf), kind="stable")
    got, nxt = [], f"/jobs/{jid}/gallery?limit=1000"
    while nxt:
        page = c.get(nxt).json()
        got += page["data"]
        nxt = page["next"]
    assert [r["index"] for r in got] == want.tolist() and [r["rank"] for r in got] == list(range(N))
    assert [r["index"] for r in got[:2]] == [11, 4000]
    r = got[5]
    assert r["name"] == arrays["names"][r["index"]] and r["matrix"] == arrays["matrix"][r["index"]].tolist()
    assert r["input_url"].startswith(f"/jobs/{jid}/inputs/")
    mid = c.get(f"/jobs/{jid}/gallery?offset=2500&limit=3").json()
    assert [x["rank"] for x in mid["data"]] == [2500, 2501, 2502] and mid["total"] == N
    assert [x["index"] for x in mid["data"]] == want[2500:2503].tolist()
    assert c.get(f"/jobs/{jid}/gallery?offset={N}").json()["data"] == []
    assert c.get(f"/jobs/{jid}/gallery?limit=1001").status_code == 422
    assert c.get(f"/jobs/{jid}/gallery", headers=auth("bob")).status_code == 404  # another tenant's job


def test_summary_is_the_reports_checks_in_words(setup):
    c, store, data = setup
    jid, d = _job(store, data)
    out = d / "output"
    out.mkdir(parents=True)
    metrics = {"n_images": 3, "method": "dprc", "warp": "affine", "device": "cpu", "apsnr_before": 11.5,
               "apsnr_after": 14.25, "residual_summary": {"mean": 3, "median": 2.5, "p95": 7, "max": 9,
                                                          "n_outliers": 1},
               "framing_summary": {"content_kept_median": 0.7, "content_kept_p10": 0.5, "area_scale_median": 1.9,
                                   "n_cropped": 2, "n_touching_edge": None},
               "warnings": ["the aligned frames shrink the objects"], "notes": ["a note"], "seconds": 4.0}
    (out / "metrics.json").write_text(json.dumps(metrics))
    for k in ("mean_before", "mean_after"):  # the variance images are missing: no link to them
        (out / f"{k}.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    s = c.get(f"/jobs/{jid}/summary").json()
    assert s["checks"] == [{"name": x.name, "value": x.value, "meaning": x.meaning} for x in checks(metrics)]
    assert s["warnings"] == metrics["warnings"] and s["notes"] == ["a note"]
    assert (s["apsnr_before"], s["apsnr_after"], s["method"], s["warp"]) == (11.5, 14.25, "dprc", "affine")
    assert s["images"] == {k: f"/jobs/{jid}/images/{k}" for k in ("mean_before", "mean_after")}
    assert c.get(s["images"]["mean_after"]).status_code == 200

    queued, _ = _job(store, data, status=JobStatus.running)
    r = c.get(f"/jobs/{queued}/summary")
    assert r.status_code == 409 and "running" in r.json()["detail"]


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return {"a.png": rng.integers(0, 256, (20, 30), np.uint8), "sub/b.png": rng.integers(0, 256, (12, 9, 3), np.uint8),
            "c.png": rng.integers(0, 256, (64, 40), np.uint8)}


@pytest.mark.parametrize("layout", ["folder", "zip", "tar.gz"])
def test_an_input_image_is_served_by_name_as_uploaded(setup, pictures, layout):
    c, store, data = setup
    archive = None if layout == "folder" else f"in.{layout}"
    jid, d = _job(store, data, archive=archive)
    inp = d / "input"
    inp.mkdir(parents=True)
    pics = pictures if layout != "folder" else {k.rsplit("/", 1)[-1]: v for k, v in pictures.items()}
    if layout == "folder":
        for n, a in pics.items():
            (inp / n).write_bytes(png_bytes(a))
    elif layout == "zip":
        with zipfile.ZipFile(inp / archive, "w") as z:
            for n, a in pics.items():
                z.writestr(n, png_bytes(a))
    else:
        with tarfile.open(inp / archive, "w:gz") as t:
            for n, a in pics.items():
                b = png_bytes(a)
                info = tarfile.TarInfo(n)
                info.size = len(b)
                t.addfile(info, io.BytesIO(b))
    for n, a in pics.items():
        r = c.get(f"/jobs/{jid}/inputs/{n}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", (n, r.text)
        np.testing.assert_array_equal(_decode(r.content), a)  # small enough: the very pixels
    small = _decode(c.get(f"/jobs/{jid}/inputs/c.png?max_side=16").content)
    assert small.shape == (16, 10)  # 64x40 shrunk to 16 on its longer side, aspect kept
    missing = c.get(f"/jobs/{jid}/inputs/nope.png")
    assert missing.status_code == 404 and "no input image named 'nope.png'" in missing.json()["detail"]
    assert c.get(f"/jobs/{jid}/inputs/c.png", headers=auth("bob")).status_code == 404


def test_an_input_path_never_leaves_the_jobs_input(setup, pictures):
    c, store, data = setup
    jid, d = _job(store, data)
    (d / "input").mkdir(parents=True)
    (d / "input" / "a.png").write_bytes(png_bytes(pictures["a.png"]))
    (d / "secret.png").write_bytes(png_bytes(pictures["c.png"]))
    for name in ("..%2Fsecret.png", "%2E%2E%2Fsecret.png", "%2Fetc%2Fpasswd"):
        r = c.get(f"/jobs/{jid}/inputs/{name}")
        assert r.status_code == 404 and "no input image named" in r.json()["detail"], (name, r.text)
    # Below HTTP, where no client normalises '..' away first.
    for name in ("../secret.png", "a.png/../../secret.png", str(d / "secret.png")):
        with pytest.raises(InputUnavailable, match="no input image named"):
            input_png(d / "input", name, 64)
    assert input_png(d / "input", "a.png", 64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_array_inputs_image_is_its_row(setup):
    c, store, data = setup
    arr = np.random.default_rng(1).integers(0, 256, (5, 8, 6), np.uint8)
    jid, d = _job(store, data, archive="x.npy")
    (d / "input").mkdir(parents=True)
    np.save(d / "input" / "x.npy", arr)
    np.testing.assert_array_equal(_decode(c.get(f"/jobs/{jid}/inputs/000003.png").content), arr[3])
    assert c.get(f"/jobs/{jid}/inputs/000009.png").status_code == 404

    # A folder of array shards (a dataset's layout): names are <shard>/<row>.png.
    jid, d = _job(store, data)
    (d / "input").mkdir(parents=True)
    np.save(d / "input" / "a.npy", arr[:2])
    np.save(d / "input" / "b.npy", arr[2:])
    np.testing.assert_array_equal(_decode(c.get(f"/jobs/{jid}/inputs/b/000001.png").content), arr[3])
    np.testing.assert_array_equal(_decode(c.get(f"/jobs/{jid}/inputs/a/000000.png").content), arr[0])
    assert c.get(f"/jobs/{jid}/inputs/a/000002.png").status_code == 404


def test_the_model_downloads_as_one_zip(setup):
    c, store, data = setup
    jid, d = _job(store, data, result={"n_images": 3, "has_model": True})
    model = d / "output" / "model"
    model.mkdir(parents=True)
    files = {"pipeline.json": json.dumps({"method": "dprc", "warp": "affine", "working_size": [28, 28],
                                          "channels": 1}).encode(),
             "config.json": b"{}", "aligner.safetensors": bytes(range(256)) * 10}
    for n, b in files.items():
        (model / n).write_bytes(b)
    assert c.get(f"/models/{jid}").json()["links"]["download"] == f"/models/{jid}/download"
    links = c.get(f"/jobs/{jid}").json()["links"]
    assert links["model_download"] == f"/models/{jid}/download"
    assert (links["gallery"], links["summary"]) == (f"/jobs/{jid}/gallery", f"/jobs/{jid}/summary")
    r = c.get(f"/models/{jid}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f'filename="model-{jid}.zip"' in r.headers["content-disposition"]
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert {n: z.read(n) for n in z.namelist()} == {f"model/{n}": b for n, b in files.items()}
    assert c.get(f"/models/{jid}/download").content == r.content  # built once, then served as is
    assert c.get(f"/models/{jid}/download", headers=auth("bob")).status_code == 404
    running, _ = _job(store, data, status=JobStatus.running)
    assert c.get(f"/models/{running}/download").status_code == 409
    nomodel, _ = _job(store, data)
    assert c.get(f"/models/{nomodel}/download").status_code == 404
