"""Paged per-image results read from the job output contract's arrays (helper_notes/output_contract.md).

The output folder here is written by the test, exactly as the contract specifies, for a job
record marked succeeded (as ``test_service_e2e.py`` plants a model): every answer is checked
against the arrays it came from. Real jobs page from their JSON today and from these arrays
once ``models/pipeline.py`` writes them (``test_service_datasets.py`` covers both).
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_testlib import auth

from service.app import create_app
from service.contracts import JobKind, JobRecord, JobStatus, new_job_id

N = 200_000
PER_IMAGE = np.dtype([("residual", "<f4"), ("outlier", "?"), ("content_kept", "<f4"), ("area_scale", "<f4"),
                      ("edge_contact", "<f4"), ("touches_edge", "i1"), ("consistency_px", "<f4"),
                      ("fill", "<f4", (1,)), ("input_size", "<i4", (2,)), ("fallback", "i1")])


def write_contract_output(out, n: int, seed: int = 0) -> dict:
    """A large job's output folder per the contract; returns the arrays written."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    mats = np.tile(np.eye(3), (n, 1, 1)) + rng.normal(0, 0.05, (n, 3, 3))
    mats[:, 2, 2] = 1.0
    np.save(out / "transforms.npy", mats)
    names = [f"shard-{i // 65536:05d}/{i % 65536:05d}.png" for i in range(n)]
    if n > 7:
        names[7] = "ünïcode naïve/ø 7.png"  # UTF-8, spaces: bytes and characters differ
    blob = [(s + "\n").encode() for s in names]
    (out / "names.txt").write_bytes(b"".join(blob))
    np.save(out / "names.idx.npy", np.concatenate([[0], np.cumsum([len(b) for b in blob])]).astype(np.int64))
    per = np.zeros(n, PER_IMAGE)
    per["residual"] = rng.random(n)
    per["outlier"] = rng.random(n) < 0.05
    per["content_kept"] = rng.random(n)
    per["area_scale"] = 1 + rng.random(n)
    per["edge_contact"] = rng.random(n)
    per["touches_edge"] = rng.integers(-1, 2, n)
    per["consistency_px"] = rng.random(n)
    per["consistency_px"][::3] = np.nan  # not measured
    per["fill"][:, 0] = rng.integers(0, 256, n)
    per["input_size"] = [28, 28]
    per["fallback"] = rng.integers(-1, 2, n)
    np.save(out / "per_image.npy", per)
    arrays = {"matrix": "transforms.npy", "names": "names.txt", "per_image": "per_image.npy"}
    (out / "transforms.json").write_text(json.dumps({"convention": "...", "output_size": [28, 28],
                                                     "n_images": n, "arrays": arrays}))
    (out / "metrics.json").write_text(json.dumps({"n_images": n, "arrays": arrays}))
    return {"matrix": mats, "names": names, "per": per}


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(per_image_page_size_max=10_000)


@pytest.fixture(scope="module")
def big_job(env):
    store = env.store()
    rec = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice", status=JobStatus.succeeded,
                    finished_at=time.time(), n_inputs=N,
                    result={"n_images": N, "has_model": False,
                            "array_files": ["transforms.npy", "per_image.npy", "names.txt"]})
    store.insert(rec)
    arrays = write_contract_output(env.data_dir / "jobs" / rec.id / "output", N)
    return rec.id, arrays


@pytest.fixture(scope="module")
def api(env):
    with TestClient(create_app(env.settings()), headers=auth()) as c:
        yield c


def _expect(arrays, i: int) -> dict:
    p = arrays["per"][i]
    r4 = lambda v: None if not np.isfinite(v) else round(float(v), 4)  # noqa: E731
    return {"index": i, "name": arrays["names"][i], "matrix": arrays["matrix"][i].tolist(),
            "fill": [r4(p["fill"][0])], "input_size": [28, 28], "residual": r4(p["residual"]),
            "outlier": bool(p["outlier"]), "content_kept": r4(p["content_kept"]), "area_scale": r4(p["area_scale"]),
            "edge_contact": r4(p["edge_contact"]),
            "touches_edge": None if p["touches_edge"] < 0 else bool(p["touches_edge"]),
            "consistency_px": r4(p["consistency_px"]), "fallback": None if p["fallback"] < 0 else bool(p["fallback"]), "aligned_url": None}


def test_pages_are_the_arrays_row_for_row(api, big_job):
    jid, arrays = big_job
    job = api.get(f"/jobs/{jid}").json()
    assert job["links"]["per_image"] == f"/jobs/{jid}/per-image"
    assert job["links"]["transforms_npy"] and job["links"]["per_image_npy"] and job["links"]["names_txt"]
    first = api.get(f"/jobs/{jid}/per-image?limit=10000").json()
    assert first["source"] == "arrays" and first["total"] == N and len(first["data"]) == 10_000
    assert first["next"] == f"/jobs/{jid}/per-image?offset=10000&limit=10000"
    for i in (0, 1, 2, 3, 7, 9_999):
        assert first["data"][i] == _expect(arrays, i), i
    assert first["data"][7]["name"] == "ünïcode naïve/ø 7.png"
    assert first["data"][0]["consistency_px"] is None  # NaN: not measured
    flags = {r["touches_edge"] for r in first["data"]}
    assert flags == {None, True, False}  # -1 is "check off", not a boolean
    t0 = time.perf_counter()
    last = api.get(f"/jobs/{jid}/per-image?offset={N - 7}&limit=10000").json()
    page_s = time.perf_counter() - t0
    assert [r["index"] for r in last["data"]] == list(range(N - 7, N)) and last["next"] is None
    assert last["data"] == [_expect(arrays, i) for i in range(N - 7, N)]
    mid = api.get(f"/jobs/{jid}/per-image?offset=131070&limit=5").json()  # across a shard boundary
    assert [r["name"] for r in mid["data"]] == arrays["names"][131070:131075]
    print(f"\nlast page of a {N}-image job: {page_s * 1000:.0f} ms")


def test_offsets_and_limits_out_of_range_are_4xx_or_empty_never_5xx(api, big_job):
    jid, _ = big_job
    for off in (N, N + 1, 2**63, 2**63 + 1, 10**30):
        r = api.get(f"/jobs/{jid}/per-image?offset={off}&limit=10")
        assert r.status_code == 200 and r.json()["data"] == [] and r.json()["next"] is None, (off, r.text)
    for q in ("limit=10001", "limit=0", "offset=-1", "offset=1.5", "limit=abc"):
        r = api.get(f"/jobs/{jid}/per-image?{q}")
        assert r.status_code == 422, (q, r.text)
    assert "at most 10000" in json.dumps(api.get(f"/jobs/{jid}/per-image?limit=10001").json()["detail"])


def test_array_downloads_are_the_files(api, big_job, env):
    jid, arrays = big_job
    out = env.data_dir / "jobs" / jid / "output"
    m = np.load(io.BytesIO(api.get(f"/jobs/{jid}/transforms.npy").content), allow_pickle=False)
    assert m.dtype == np.float64 and np.array_equal(m, arrays["matrix"])
    p = np.load(io.BytesIO(api.get(f"/jobs/{jid}/per_image.npy").content), allow_pickle=False)
    assert p.dtype == PER_IMAGE and np.array_equal(p["residual"], arrays["per"]["residual"])
    r = api.get(f"/jobs/{jid}/names.txt")
    assert r.content == (out / "names.txt").read_bytes() and r.headers["content-type"].startswith("text/plain")


def test_another_tenant_and_unfinished_jobs(api, big_job, env):
    jid, _ = big_job
    for path in (f"/jobs/{jid}/per-image", f"/jobs/{jid}/transforms.npy", f"/jobs/{jid}/names.txt"):
        assert api.get(path, headers=auth("bob")).status_code == 404
    queued = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice")
    env.store().insert(queued)
    r = api.get(f"/jobs/{queued.id}/per-image")
    assert r.status_code == 409 and "queued" in r.json()["detail"]


def test_outputs_that_cannot_be_paged_are_404_naming_the_file(api, env):
    store = env.store()

    def planted(write) -> str:
        rec = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice", status=JobStatus.succeeded,
                        finished_at=time.time(), result={"n_images": 5})
        store.insert(rec)
        out = env.data_dir / "jobs" / rec.id / "output"
        write(out)
        return rec.id

    def short_index(out):
        write_contract_output(out, 5)
        np.save(out / "names.idx.npy", np.zeros(3, np.int64))

    def no_images(out):
        out.mkdir(parents=True)
        (out / "transforms.json").write_text(json.dumps({"n_images": 5, "arrays": {}}))

    def pickled(out):
        write_contract_output(out, 5)
        np.save(out / "per_image.npy", np.array([{"x": 1}] * 5, dtype=object), allow_pickle=True)

    for write, text in ((short_index, "names.idx.npy"), (no_images, "no transforms.npy"),
                        (pickled, "per_image.npy"), (lambda out: None, "transforms.json")):
        r = api.get(f"/jobs/{planted(write)}/per-image")
        assert r.status_code == 404 and text in r.json()["detail"], (text, r.text)
    r = api.get(f"/jobs/{planted(no_images)}/transforms.npy")
    assert r.status_code == 404 and "no transforms.npy" in r.json()["detail"]
