"""Datasets: uploaded once in resumable chunks, validated, named by several jobs.

Against real Redis (and SQLite in embedded mode), real ``uvicorn`` over real HTTP where the
transport matters (a dropped connection, the API's memory), and a real Celery worker for jobs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import time
import urllib.parse

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testlib import SAMPLES, auth, pid_alive, png_bytes, wait_job

from service.app import create_app
from service.client import ApiError, Client
from service.contracts import Settings
from service.contracts.redis_store import RedisDatasetStore
from service.devserver import start_api

pytestmark = pytest.mark.integration



def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def digits(n: int, seed: int = 0) -> np.ndarray:
    """``n`` 28x28 uint8 images: the bundled sample digits, cycled, each shifted a little."""
    base = [np.asarray(Image.open(p)) for p in SAMPLES]
    rng = np.random.default_rng(seed)
    return np.stack([np.roll(base[i % len(base)], tuple(rng.integers(-2, 3, 2)), (0, 1)) for i in range(n)])


def create(c, files: dict[str, bytes], declare_sizes: bool = True, sha: bool = True, headers=None, **extra):
    body = {"files": [{"name": n, **({"size": len(b)} if declare_sizes else {}),
                       **({"sha256": hashlib.sha256(b).hexdigest()} if sha else {})} for n, b in files.items()],
            **extra}
    return c.post("/datasets", json=body, headers=headers)


def put(c, ds: dict, name: str, data: bytes, start: int, total: int | None, headers=None):
    rng = f"bytes {start}-{start + len(data) - 1}/{'*' if total is None else total}"
    return c.put(f"/datasets/{ds['id']}/files/{urllib.parse.quote(name)}", content=data,
                 headers={"Content-Range": rng, **(headers or {})})


def upload(c, ds: dict, files: dict[str, bytes], chunk: int = 1 << 20, headers=None) -> None:
    for name, data in files.items():
        for o in range(0, len(data), chunk):
            r = put(c, ds, name, data[o:o + chunk], o, len(data), headers)
            assert r.status_code == 200, r.text


def wait_ready(c, ds_id: str, headers=None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        d = c.get(f"/datasets/{ds_id}", headers=headers).json()
        if d["state"] not in ("uploading", "validating"):
            return d
        assert time.monotonic() < deadline, d
        time.sleep(0.1)


def make_dataset(c, files: dict[str, bytes], headers=None, chunk: int = 1 << 20) -> dict:
    r = create(c, files, headers=headers)
    assert r.status_code == 201, r.text
    ds = r.json()
    upload(c, ds, files, chunk, headers)
    r = c.post(f"/datasets/{ds['id']}/complete", headers=headers)
    assert r.status_code in (200, 202), r.text
    return wait_ready(c, ds["id"], headers)


def sample_pngs(n: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in SAMPLES[:n]}


# ---------------------------------------------------------------------- API without a worker (Redis)


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(max_jobs_in_flight_per_key=10_000, per_image_page_size_max=16)


@pytest.fixture(scope="module")
def api(env):
    with TestClient(create_app(env.settings()), headers=auth(), raise_server_exceptions=False) as c:
        yield c


def test_a_dataset_is_declared_uploaded_validated_and_frozen(api, env):
    a = digits(40)
    raw = npy_bytes(a)
    r = create(api, {"digits.npy": raw}, label="forty digits")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert r.headers["location"] == ds["links"]["self"] == f"/datasets/{ds['id']}"
    assert ds["state"] == "uploading" and ds["layout"] == "bundle" and ds["label"] == "forty digits"
    assert ds["files"] == [{"name": "digits.npy", "size": len(raw), "received": 0, "complete": False,
                            "sha256": hashlib.sha256(raw).hexdigest()}]
    upload(api, ds, {"digits.npy": raw}, chunk=4096)  # many small chunks
    got = api.get(ds["links"]["self"]).json()
    assert got["bytes_received"] == len(raw) and got["files"][0]["complete"]
    on_disk = env.data_dir / "datasets" / ds["id"] / "files" / "digits.npy"
    assert on_disk.read_bytes() == raw
    r = api.post(ds["links"]["complete"])
    assert r.status_code == 202 and r.json()["state"] in ("validating", "ready")
    done = wait_ready(api, ds["id"])
    assert done["state"] == "ready", done
    assert done["n_images"] == 40 and done["image_size"] == [28, 28] and done["channels"] == 1
    assert done["links"]["upload"] is None and done["jobs_in_flight"] == []
    names = (env.data_dir / "datasets" / ds["id"] / "names.txt").read_text().splitlines()
    assert names == [f"{i:06d}.png" for i in range(40)]
    assert api.post(ds["links"]["complete"]).status_code == 200  # again: harmless
    r = put(api, ds, "digits.npy", b"x", 0, len(raw))
    assert r.status_code == 409 and "ready" in r.json()["detail"]  # frozen
    assert on_disk.stat().st_mode & 0o222 == 0  # read-only on disk too
    listed = api.get("/datasets").json()
    assert ds["id"] in [d["id"] for d in listed["data"]]


def test_a_chunk_at_the_wrong_offset_is_409_naming_the_expected_offset(api, env):
    raw = npy_bytes(digits(20))
    ds = create(api, {"a.npy": raw}).json()
    assert put(api, ds, "a.npy", raw[:1000], 0, len(raw)).status_code == 200
    for start in (0, 500, 1500):  # behind, inside, ahead of where the file stands
        r = put(api, ds, "a.npy", raw[start:start + 100], start, len(raw))
        assert r.status_code == 409, r.text
        assert r.headers["upload-offset"] == "1000" and "offset 1000" in r.json()["detail"]
    f = api.get(ds["links"]["self"]).json()["files"][0]
    assert f["received"] == 1000
    assert (env.data_dir / "datasets" / ds["id"] / "files" / "a.npy").read_bytes() == raw[:1000]
    assert put(api, ds, "a.npy", raw[1000:], 1000, len(raw)).status_code == 200
    assert (env.data_dir / "datasets" / ds["id"] / "files" / "a.npy").read_bytes() == raw


def test_bad_ranges_and_bodies_are_4xx_and_keep_nothing_wrong(api, env):
    raw = npy_bytes(digits(10))
    ds = create(api, {"a.npy": raw}).json()
    url = f"/datasets/{ds['id']}/files/a.npy"
    path = env.data_dir / "datasets" / ds["id"] / "files" / "a.npy"
    cases = [
        ({"Content-Range": "bytes=0-9/10"}, raw[:10], 400, "Content-Range"),
        ({"Content-Range": "bytes 9-0/100"}, raw[:10], 416, "before the first"),
        ({"Content-Range": f"bytes 0-9/{len(raw) + 1}"}, raw[:10], 416, "declared"),
        ({"Content-Range": f"bytes {len(raw) - 5}-{len(raw) + 4}/{len(raw) + 5}"}, raw[:10], 416, "declared"),
        ({"Content-Range": f"bytes 0-19/{len(raw)}"}, raw[:10], 400, "Content-Length"),
    ]
    for headers, body, status, text in cases:
        r = api.put(url, content=body, headers=headers)
        assert r.status_code == status and text in str(r.json()["detail"]), (headers, r.status_code, r.text)
    # A body longer than its range (chunked, so no Content-Length to catch it first): nothing kept.
    r = api.put(url, content=iter([raw[:600], raw[600:1200]]), headers={"Content-Range": f"bytes 0-999/{len(raw)}"})
    assert r.status_code == 400 and "longer" in r.json()["detail"], r.text
    assert path.stat().st_size == 0 and api.get(ds["links"]["self"]).json()["files"][0]["received"] == 0
    assert api.put(f"/datasets/{ds['id']}/files/b.npy", content=b"x").status_code == 404
    # Not fully uploaded: complete names the file and how far it got.
    assert put(api, ds, "a.npy", raw[:100], 0, len(raw)).status_code == 200
    r = api.post(ds["links"]["complete"])
    assert r.status_code == 409 and f"a.npy: 100 of {len(raw)} bytes" in r.json()["detail"]
    # The whole file in one request, no Content-Range, is the same as one chunk from 0.
    other = create(api, {"b.npy": raw}).json()
    assert api.put(f"/datasets/{other['id']}/files/b.npy", content=raw).status_code == 200
    assert api.get(other["links"]["self"]).json()["files"][0]["complete"]


def test_an_undeclared_size_is_fixed_by_the_first_chunk(api):
    raw = npy_bytes(digits(10))
    ds = create(api, {"a.npy": raw}, declare_sizes=False).json()
    assert ds["files"][0]["size"] is None
    r = api.put(f"/datasets/{ds['id']}/files/a.npy", content=raw[:50], headers={"Content-Range": "bytes 0-49/*"})
    assert r.status_code == 411  # unknown total and no declared size: nothing to check a chunk against
    assert put(api, ds, "a.npy", raw[:50], 0, len(raw)).status_code == 200
    assert put(api, ds, "a.npy", raw[50:], 50, None).status_code == 200  # '*' once the size is known
    d = api.get(ds["links"]["self"]).json()
    assert d["files"][0]["size"] == len(raw) and d["bytes_declared"] == len(raw) and d["files"][0]["complete"]


@pytest.mark.parametrize("files, field_text", [
    ({"files": []}, "at least 1"),
    ({"files": [{"name": "a.png"}, {"name": "a.png"}]}, "declared twice"),
    ({"files": [{"name": "sub/a.png"}]}, "not a path"),
    ({"files": [{"name": ".."}]}, "not a path"),
    ({"files": [{"name": ".hidden.png"}]}, "visible"),
    ({"files": [{"name": "run.sh"}]}, "not an accepted file"),
    ({"files": [{"name": "a.png"}, {"name": "b.npy"}]}, "do not make one collection"),
    ({"files": [{"name": "a.zip"}, {"name": "b.tar.gz"}]}, "do not make one collection"),
    ({"files": [{"name": "a.png", "sha256": "xyz"}]}, "sha256"),
    ({"files": [{"name": "a.png", "size": -1}]}, "size"),
    ({"files": [{"name": "a.png"}], "colour": "red"}, "colour"),
])
def test_bad_declarations_are_422_naming_the_field(api, files, field_text):
    r = api.post("/datasets", json=files)
    assert r.status_code == 422, r.text
    assert field_text in json.dumps(r.json()["detail"]), r.json()


def test_a_declaration_that_is_not_json_is_415(api):
    r = api.post("/datasets", data={"files": "a.png"})
    assert r.status_code == 415 and "JSON" in r.json()["detail"]
    for raw in (b"{not json", b"\xff\xfe\x80", b'{"files": [{"name": "\xff.png"}]}'):  # not even UTF-8
        r = api.post("/datasets", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)


def test_another_tenants_dataset_is_404_everywhere(api, env):
    ds = make_dataset(api, sample_pngs(4))
    assert ds["state"] == "ready"
    bob = auth("bob")
    for method, path in (("GET", ds["links"]["self"]), ("POST", f"{ds['links']['self']}/complete"),
                         ("DELETE", ds["links"]["self"]), ("PUT", f"{ds['links']['self']}/files/{SAMPLES[0].name}")):
        r = api.request(method, path, headers=bob, content=b"x" if method == "PUT" else None)
        assert r.status_code == 404 and "no dataset" in r.json()["detail"], (method, r.text)
    assert ds["id"] not in [d["id"] for d in api.get("/datasets", headers=bob).json()["data"]]
    r = api.post("/jobs", files={"dataset": (None, ds["id"])}, headers=bob)
    assert r.status_code == 404 and "no dataset" in r.json()["detail"]
    assert api.get(ds["links"]["self"]).json()["state"] == "ready"  # untouched
    for bad in ("nope", "ds" + "0" * 32, "../../jobs", "ds" + "a" * 32 + "\n"):
        assert api.get(f"/datasets/{urllib.parse.quote(bad, safe='')}").status_code == 404


def test_jobs_name_a_dataset_instead_of_files(api, env):
    ds = make_dataset(api, sample_pngs(6))
    names = sorted(p.name for p in SAMPLES[:6])
    r = api.post("/jobs", files={"dataset": (None, ds["id"])}, data={"budget": "2", "reference": names[3]})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["n_images"] == 6 and job["links"]["dataset"] == ds["links"]["self"]
    rec = env.store().get(job["id"])
    assert rec.dataset_id == ds["id"] and rec.input_archive is None
    assert list((env.data_dir / "jobs" / job["id"] / "input").iterdir()) == []  # read in place, not copied
    second = api.post("/jobs", files={"dataset": (None, ds["id"])}, data={"budget": "2"})
    assert second.status_code == 202
    assert sorted(api.get(ds["links"]["self"]).json()["jobs_in_flight"]) == sorted([job["id"], second.json()["id"]])
    bad = [
        (dict(files={"dataset": (None, ds["id"]), "files": ("a.png", SAMPLES[0].read_bytes(), "image/png")}),
         422, "not both"),
        (dict(files={"dataset": (None, ds["id"])}, data={"reference": "nope.png"}), 422, "reference"),
        (dict(files={"dataset": (None, "ds" + "1" * 32)}), 404, "no dataset"),
    ]
    for kw, status, text in bad:
        r = api.post("/jobs", **kw)
        assert r.status_code == status and text in json.dumps(r.json()["detail"]), r.text
    uploading = create(api, sample_pngs(2)).json()
    r = api.post("/jobs", files={"dataset": (None, uploading["id"])})
    assert r.status_code == 409 and "uploading" in r.json()["detail"]
    # Refused jobs do not hold the dataset.
    assert len(api.get(ds["links"]["self"]).json()["jobs_in_flight"]) == 2


def test_delete_is_refused_while_a_queued_job_uses_the_dataset(api, env):
    ds = make_dataset(api, sample_pngs(4))
    files_dir = env.data_dir / "datasets" / ds["id"]
    jid = api.post("/jobs", files={"dataset": (None, ds["id"])}).json()["id"]  # no worker here: it stays queued
    r = api.delete(ds["links"]["self"])
    assert r.status_code == 409 and jid in r.json()["detail"] and "in use" in r.json()["detail"]
    assert files_dir.is_dir() and api.get(ds["links"]["self"]).json()["state"] == "ready"
    assert api.delete(f"/jobs/{jid}").status_code == 202  # cancelled: no longer in flight
    assert api.delete(ds["links"]["self"]).status_code == 204
    assert not files_dir.exists() and api.get(ds["links"]["self"]).status_code == 404
    r = api.post("/jobs", files={"dataset": (None, ds["id"])})
    assert r.status_code == 404


def test_invalid_content_makes_an_invalid_dataset_with_the_reason(api):
    cases = {
        "corrupt": ({"a.png": SAMPLES[0].read_bytes(), "b.png": b"\x89PNG\r\n\x1a\nnot an image"}, 422, "b.png"),
        "not an array": ({"x.npy": b"\x93NUMPY garbage"}, 422, "x.npy"),
        "tar member escapes": (None, 422, ".."),
    }
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        data = SAMPLES[0].read_bytes()
        info = tarfile.TarInfo("../evil.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    cases["tar member escapes"] = ({"x.tar": tbuf.getvalue()}, 422, "..")
    for what, (files, status, text) in cases.items():
        d = make_dataset(api, files)
        assert d["state"] == "invalid" and d["error_status"] == status and text in d["error"], (what, d)
        r = api.post(f"/datasets/{d['id']}/complete")
        assert r.status_code == 409 and "invalid" in r.json()["detail"]
        r = api.post("/jobs", files={"dataset": (None, d["id"])})
        assert r.status_code == 409 and "invalid" in r.json()["detail"]


def test_a_checksum_mismatch_is_invalid(api):
    raw = npy_bytes(digits(4))
    r = api.post("/datasets", json={"files": [{"name": "a.npy", "size": len(raw), "sha256": "0" * 64}]})
    ds = r.json()
    upload(api, ds, {"a.npy": raw})
    api.post(ds["links"]["complete"])
    d = wait_ready(api, ds["id"])
    assert d["state"] == "invalid" and "sha256" in d["error"]


def test_validation_memory_and_time_are_bounded(make_env):
    # A 6000 x 6000 RGB PNG is 120 kB on disk and 108 MB decoded (more while converted): over a
    # 128 MiB check process, whose code alone takes about 55 MB.
    big = png_bytes(np.full((6000, 6000, 3), 7, np.uint8))
    env = make_env(dataset_check_memory_bytes=128 * 1024**2)
    with TestClient(create_app(env.settings()), headers=auth()) as c:
        d = make_dataset(c, {"big.png": big, "small.png": SAMPLES[0].read_bytes()})
        assert d["state"] == "invalid" and d["error_status"] == 413 and "memory" in d["error"], d
        assert c.get("/healthz").status_code == 200
    with TestClient(create_app(env.settings(dataset_check_timeout_s=0.05)), headers=auth()) as c:
        d = make_dataset(c, sample_pngs(3))
        assert d["state"] == "invalid" and "longer than" in d["error"], d
    with TestClient(create_app(env.settings()), headers=auth()) as c:  # the same files are fine in time
        assert make_dataset(c, sample_pngs(3))["state"] == "ready"


def test_limits_are_413_naming_them(make_env):
    env = make_env(max_dataset_files=3, max_dataset_bytes=10_000, max_datasets_per_key=4, max_images_per_job=5)
    with TestClient(create_app(env.settings()), headers=auth()) as c:
        r = c.post("/datasets", json={"files": [{"name": f"{i}.png"} for i in range(4)]})
        assert r.status_code == 413 and "limit of 3 per dataset" in r.json()["detail"]
        r = c.post("/datasets", json={"files": [{"name": "a.npy", "size": 10_001}]})
        assert r.status_code == 413 and "10000 bytes per dataset" in r.json()["detail"]
        # An undeclared size counts from the first chunk's total.
        ds = c.post("/datasets", json={"files": [{"name": "a.png", "size": 6000}, {"name": "b.png"}]}).json()
        r = c.put(f"/datasets/{ds['id']}/files/b.png", content=b"x" * 10,
                  headers={"Content-Range": "bytes 0-9/5000"})
        assert r.status_code == 413 and "10000 bytes per dataset" in r.json()["detail"]
        # A declaration too large to be one (many times what 3 files need) is refused unread.
        r = c.post("/datasets", content=b"{" + b" " * 20_000 + b"}", headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        # More images than a job may hold: the dataset is invalid, saying why.
        d = make_dataset(c, {"x.npy": npy_bytes(digits(6))})
        assert d["state"] == "invalid" and d["error_status"] == 413 and "above the limit of 5" in d["error"]
        for _ in range(2):  # the third and the fourth
            assert c.post("/datasets", json={"files": [{"name": "c.png"}]}).status_code == 201
        r = c.post("/datasets", json={"files": [{"name": "c.png"}]})
        assert r.status_code == 429 and "at most 4" in r.json()["detail"]
    # A dataset validated under a larger limit, named by a job where the limit is lower: 413 for the job.
    big = make_env(max_images_per_job=100)
    with TestClient(create_app(big.settings()), headers=auth()) as c:
        d = make_dataset(c, {"x.npy": npy_bytes(digits(6))})
        assert d["state"] == "ready"
    with TestClient(create_app(big.settings(max_images_per_job=5)), headers=auth()) as c:
        r = c.post("/jobs", files={"dataset": (None, d["id"])})
        assert r.status_code == 413 and "6 images, above the limit of 5 per job" in r.json()["detail"]
        assert c.get(f"/datasets/{d['id']}").json()["jobs_in_flight"] == []


def test_the_defaults_take_a_ten_million_image_job():
    s = Settings()
    shard = 65_536 * 28 * 28 + 128  # one uint8 .npy shard of the contract's size, header included
    n_shards = -(-10_000_000 // 65_536)
    assert s.max_images_per_job >= 10_000_000
    assert s.max_dataset_bytes >= n_shards * shard and s.max_dataset_files >= n_shards


# ---------------------------------------------------------------------- real HTTP (uvicorn)


@pytest.fixture(scope="module")
def server(make_env):
    env = make_env(rate_limit_per_minute=0)
    proc, base = start_api({**os.environ, **env.vars})
    yield env, proc, base
    proc.terminate()
    proc.wait(timeout=30)


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def test_an_upload_cut_off_mid_chunk_resumes_where_the_server_says(server, tmp_path):
    env, _, base = server
    raw = npy_bytes(digits(6000, seed=3))  # 4.7 MB
    cli = Client(base, headers=auth())
    path = tmp_path / "digits.npy"
    path.write_bytes(raw)
    ds = cli.create_dataset([path])
    # One PUT for the whole file, over a raw socket; the connection drops after 3 MB of it.
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    sent = 3_000_000
    with socket.create_connection((host, int(port))) as s:
        head = (f"PUT /datasets/{ds['id']}/files/digits.npy HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: {auth()['Authorization']}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes 0-{len(raw) - 1}/{len(raw)}\r\nContent-Length: {len(raw)}\r\n\r\n")
        s.sendall(head.encode())
        for o in range(0, sent, 100_000):
            s.sendall(raw[o:o + 100_000])
        time.sleep(1.0)  # let the server write what it got
    deadline = time.monotonic() + 30
    while True:  # the server notices the drop, records what reached the disk, frees the file
        f = cli.get(f"/datasets/{ds['id']}")["files"][0]
        if f["received"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    got = f["received"]
    assert 1_000_000 <= got <= sent, f  # what arrived is kept (less uvicorn's unread buffer), never more
    on_disk = env.data_dir / "datasets" / ds["id"] / "files" / "digits.npy"
    assert on_disk.read_bytes() == raw[:got]
    # Resuming anywhere else is refused with the offset to use; from there it completes.
    with pytest.raises(ApiError) as e:
        cli.request("PUT", f"/datasets/{ds['id']}/files/digits.npy", raw[:10],
                    {"Content-Range": f"bytes 0-9/{len(raw)}"})
    assert e.value.status == 409 and f"offset {got}" in e.value.detail
    final = cli.upload_dataset_files(ds["id"], [path], chunk_bytes=1 << 20)
    assert final["files"][0]["received"] == len(raw)
    done = cli.complete_dataset(ds["id"], timeout=60, every=0.2)
    assert done["state"] == "ready" and done["n_images"] == 6000, done  # the declared sha256 matched
    assert on_disk.read_bytes() == raw


def test_a_multi_mb_npy_in_small_chunks_keeps_the_api_memory_flat(server, tmp_path):
    """The API's peak RSS (VmHWM, reset first) while 64 MB arrive in 256 kB chunks, one 16 MB
    chunk, and the dataset is validated: bounded far below the data (docs/reliability.md)."""
    env, proc, base = server
    cli = Client(base, headers=auth())
    a = np.random.default_rng(1).integers(0, 256, (80_000, 28, 28), dtype=np.uint8)  # 62.7 MB
    path = tmp_path / "big.npy"
    np.save(path, a)
    size = path.stat().st_size
    ds = cli.create_dataset([path], checksums=False)
    cli.upload_dataset_files(ds["id"], [path], chunk_bytes=256 * 1024)  # warm-up pass: 256 kB chunks
    # A second dataset measured from a reset peak, the first having warmed every code path.
    ds = cli.create_dataset([path], checksums=False)
    rss0 = _status_kb(proc.pid, "VmRSS")
    with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.monotonic()
    with open(path, "rb") as f:
        head = f.read(size - 16 * 1024 * 1024)
    for o in range(0, len(head), 256 * 1024):
        chunk = head[o:o + 256 * 1024]
        cli.request("PUT", f"/datasets/{ds['id']}/files/big.npy", chunk,
                    {"Content-Range": f"bytes {o}-{o + len(chunk) - 1}/{size}"})
    del head
    with open(path, "rb") as f:
        f.seek(size - 16 * 1024 * 1024)
        tail = f.read()
    cli.request("PUT", f"/datasets/{ds['id']}/files/big.npy", tail,
                {"Content-Range": f"bytes {size - len(tail)}-{size - 1}/{size}"})
    del tail
    upload_s = time.monotonic() - t0
    done = cli.complete_dataset(ds["id"], timeout=120, every=0.2)
    peak = _status_kb(proc.pid, "VmHWM")
    growth_mb = (peak - rss0) / 1024
    print(f"\nAPI RSS before {rss0 / 1024:.1f} MB, peak {peak / 1024:.1f} MB: +{growth_mb:.1f} MB for a "
          f"{size / 1e6:.1f} MB upload ({size // (256 * 1024)} chunks of 256 kB + one of 16 MB, {upload_s:.1f} s) "
          f"and its validation")
    assert done["state"] == "ready" and done["n_images"] == 80_000, done
    assert (env.data_dir / "datasets" / ds["id"] / "files" / "big.npy").stat().st_size == size
    assert growth_mb < 16, growth_mb  # the bound stated in docs/reliability.md; the file is 63 MB


def _check_processes(dataset_id: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"service.dataset_check" in cmd and any(dataset_id.encode() in c for c in cmd):
                pids.append(int(d))
    return pids


def test_an_api_killed_while_validating_leaves_a_dataset_that_completing_again_finishes(make_env, tmp_path):
    env = make_env(rate_limit_per_minute=0)  # lease_ttl_s 4 s (service_testlib.Env)
    # 30 grey 6000 x 6000 PNGs: 1.4 MB to upload, about 6 s to decode one after the other.
    paths = []
    for i in range(30):
        p = tmp_path / f"big{i:02d}.png"
        p.write_bytes(png_bytes(np.full((6000, 6000), i, np.uint8)))
        paths.append(p)
    proc, base = start_api({**os.environ, **env.vars})
    try:
        cli = Client(base, headers=auth())
        ds = cli.create_dataset(paths)
        cli.upload_dataset_files(ds["id"], paths)
        cli.request("POST", f"/datasets/{ds['id']}/complete")
        deadline = time.monotonic() + 20
        while not (checks := _check_processes(ds["id"])):
            assert time.monotonic() < deadline, "no check process started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.kill()  # SIGKILL: no chance to record anything
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in checks):  # the check dies with its API process
        assert time.monotonic() < deadline, "the check process outlived the API"
        time.sleep(0.05)
    left = RedisDatasetStore(env.vars["CONGEAL_REDIS_URL"], env.vars["CONGEAL_KEY_PREFIX"]).get(ds["id"])
    assert left.state == "validating"  # what the dead API left: a lease that will lapse
    proc, base = start_api({**os.environ, **env.vars})  # a new API process
    try:
        cli = Client(base, headers=auth())
        t0 = time.monotonic()
        deadline = t0 + 90
        while True:  # completing again is harmless while the old lease runs, and restarts it once lapsed
            cli.request("POST", f"/datasets/{ds['id']}/complete")
            d = cli.get(f"/datasets/{ds['id']}")
            if d["state"] != "validating":
                break
            assert time.monotonic() < deadline, d
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert d["state"] == "ready" and d["n_images"] == 30, (d["state"], d["error"])


# ---------------------------------------------------------------------- jobs through the real worker


@pytest.fixture(scope="module")
def dataset_jobs(client, worker_env):
    """One dataset of 16 sample PNGs and two jobs on it, run by the session's Celery worker."""
    files = sample_pngs(16)
    ds = make_dataset(client, files, chunk=8192)
    assert ds["state"] == "ready", ds
    opts = {"budget": "1", "width": "1", "batch_size": "8", "reframe": "0"}
    ids = []
    for seed in ("0", "1"):
        r = client.post("/jobs", files={"dataset": (None, ds["id"])}, data={**opts, "seed": seed})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    refused = client.delete(ds["links"]["self"])  # both queued or running now
    jobs = [wait_job(client, j) for j in ids]
    return ds, files, jobs, refused


def test_two_jobs_on_one_dataset_through_the_worker(client, worker_env, dataset_jobs):
    ds, files, jobs, refused = dataset_jobs
    assert refused.status_code == 409 and "in use" in refused.json()["detail"]
    for job in jobs:
        assert job["status"] == "succeeded", job
        assert job["n_images"] == 16 and job["attempts"][0]["worker"].startswith(worker_env.worker.name + "@")
        assert list((worker_env.data_dir / "jobs" / job["id"] / "input").iterdir()) == []  # no copy
        t = client.get(job["links"]["transforms"]).json()
        assert sorted(i["name"] for i in t["images"]) == sorted(files)
    spec = json.loads((worker_env.data_dir / "jobs" / jobs[0]["id"] / "run.json").read_text())
    assert spec["input_path"] == str(worker_env.data_dir.resolve() / "datasets" / ds["id"] / "files")
    # The dataset was read, never written: its files are the bytes uploaded.
    for name, data in files.items():
        assert (worker_env.data_dir / "datasets" / ds["id"] / "files" / name).read_bytes() == data
    assert client.get(ds["links"]["self"]).json()["jobs_in_flight"] == []
    assert client.delete(ds["links"]["self"]).status_code == 204
    assert not (worker_env.data_dir / "datasets" / ds["id"]).exists()
    # The jobs' results outlive the dataset they read.
    assert client.get(jobs[0]["links"]["per_image"]).json()["total"] == 16


def test_a_job_pages_its_per_image_results_like_its_json(client, dataset_jobs):
    _, _, jobs, _ = dataset_jobs
    job = jobs[0]
    t = client.get(job["links"]["transforms"]).json()
    m = client.get(job["links"]["metrics"]).json()
    rows, url = [], f"{job['links']['per_image']}?limit=5"
    while url:
        page = client.get(url).json()
        assert page["total"] == 16 and page["limit"] == 5
        rows += page["data"]
        url = page["next"]
    assert [r["index"] for r in rows] == list(range(16))
    for r, ti, mi in zip(rows, t["images"], m["per_image"]):
        assert r["name"] == ti["name"] == mi["name"]
        assert np.allclose(r["matrix"], ti["matrix"], rtol=0, atol=1e-12)
        assert r["fill"] == pytest.approx(ti["fill"], abs=1e-3) and r["input_size"] == ti["input_size"]
        for k in ("residual", "content_kept", "area_scale", "edge_contact"):
            assert r[k] == pytest.approx(mi[k], abs=1e-4), k
        assert r["outlier"] == mi["outlier"] and r["touches_edge"] == mi["touches_edge"]
        assert client.get(r["aligned_url"]).headers["content-type"] == "image/png"


def test_a_real_jobs_output_has_the_contract_arrays(client, dataset_jobs):
    _, _, jobs, _ = dataset_jobs
    job = client.get(jobs[0]["links"]["self"]).json()
    assert job["links"]["transforms_npy"] and job["links"]["per_image_npy"] and job["links"]["names_txt"]
    t = client.get(job["links"]["transforms"]).json()
    mats = np.load(io.BytesIO(client.get(job["links"]["transforms_npy"]).content), allow_pickle=False)
    assert mats.shape == (16, 3, 3) and np.allclose(mats, [i["matrix"] for i in t["images"]], atol=1e-12)
    names = client.get(job["links"]["names_txt"]).text.splitlines()
    assert names == [i["name"] for i in t["images"]]
    page = client.get(f"{job['links']['per_image']}?limit=16").json()
    assert page["source"] == "arrays" and [r["name"] for r in page["data"]] == names


# ---------------------------------------------------------------------- embedded mode (SQLite, in-process runner)


def _embedded(tmp_path, **kw) -> Settings:
    return Settings(redis_url=None, allow_open=True, data_dir=tmp_path, device="cpu", checkpoint_every_s=0, lease_ttl_s=2,
                    reconcile_interval_s=0.5, **kw)


def test_embedded_job_from_a_chunked_npy_dataset_and_its_pages(tmp_path):
    s = _embedded(tmp_path, per_image_page_size_max=16)
    a = digits(40, seed=5)
    with TestClient(create_app(s)) as c:
        ds = make_dataset(c, {"digits.npy": npy_bytes(a)}, chunk=3000)
        assert ds["state"] == "ready" and ds["n_images"] == 40, ds
        r = c.post("/jobs", files={"dataset": (None, ds["id"])},
                   data={"budget": "1", "width": "1", "batch_size": "8", "reframe": "0"})
        assert r.status_code == 202, r.text
        assert c.delete(ds["links"]["self"]).status_code == 409
        job = wait_job(c, r.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
        t = c.get(job["links"]["transforms"]).json()
        url = job["links"]["per_image"]
        first = c.get(f"{url}?limit=16").json()
        assert first["total"] == 40 and first["offset"] == 0 and len(first["data"]) == 16
        assert first["next"] == f"{url}?offset=16&limit=16"
        assert [r["name"] for r in first["data"]] == [i["name"] for i in t["images"][:16]]
        last = c.get(f"{url}?offset=32&limit=16").json()
        assert [r["index"] for r in last["data"]] == list(range(32, 40)) and last["next"] is None
        assert [r["matrix"] for r in last["data"]] == [i["matrix"] for i in t["images"][32:]]
        for off in (40, 41, 10**6, 2**63, 2**64 + 5):  # at, beyond, far beyond total: an empty page, not a 5xx
            p = c.get(f"{url}?offset={off}&limit=5")
            assert p.status_code == 200 and p.json()["data"] == [] and p.json()["total"] == 40, (off, p.text)
        for q, field in (("limit=17", "limit"), ("limit=0", "limit"), ("offset=-1", "offset"),
                         ("offset=1e22", "offset"), ("offset=abc", "offset")):
            p = c.get(f"{url}?{q}")
            assert p.status_code == 422 and field in json.dumps(p.json()["detail"]), (q, p.text)
        assert c.delete(ds["links"]["self"]).status_code == 204
        assert not (tmp_path / "datasets" / ds["id"]).exists()


def test_embedded_datasets_expire_when_unused(tmp_path):
    s = _embedded(tmp_path, dataset_ttl_s=1, sweep_interval_s=0.3)
    with TestClient(create_app(s)) as c:
        ds = make_dataset(c, sample_pngs(3))
        assert (tmp_path / "datasets" / ds["id"]).is_dir()
        deadline = time.monotonic() + 20
        while c.get(ds["links"]["self"]).status_code != 404:
            assert time.monotonic() < deadline, "the unused dataset never expired"
            time.sleep(0.2)
        assert not (tmp_path / "datasets" / ds["id"]).exists()


# ---------------------------------------------------------------------- shards (the core's shard reader)


def _shards(kind: str, n_shards: int = 3, per: int = 7) -> dict[str, bytes]:
    out = {}
    for k in range(n_shards):
        a = digits(per, seed=k)
        if kind == "npy":
            out[f"shard-{k:05d}.npy"] = npy_bytes(a)
        elif kind == "npz":
            buf = io.BytesIO()
            np.savez(buf, images=a)
            out[f"shard-{k:05d}.npz"] = buf.getvalue()
        else:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                for i, im in enumerate(a):
                    data = png_bytes(im)
                    info = tarfile.TarInfo(f"{i:03d}.png")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            out[f"shard-{k:05d}.tar"] = buf.getvalue()
    return out


@pytest.mark.parametrize("kind", ["npy", "npz", "tar"])
def test_a_folder_of_shards_is_one_dataset(api, kind):
    files = _shards(kind)
    d = make_dataset(api, files)
    assert d["layout"] == "shards"
    assert d["state"] == "ready" and d["n_images"] == 21, (d["state"], d["error"])


def test_embedded_job_on_npy_shards(tmp_path):
    with TestClient(create_app(_embedded(tmp_path))) as c:
        d = make_dataset(c, _shards("npy"))
        assert d["state"] == "ready", (d["state"], d["error"])
        r = c.post("/jobs", files={"dataset": (None, d["id"])}, data={"budget": "1", "width": "1", "batch_size": "8"})
        job = wait_job(c, r.json()["id"], timeout=300)
        assert job["status"] == "succeeded" and job["n_images"] == 21, job
        names = [r["name"] for r in c.get(f"{job['links']['per_image']}?limit=21").json()["data"]]
        # The contract: <shard stem>/<index in shard, zero-padded>.png, shards in name order.
        assert [n.split("/")[0] for n in names] == [f"shard-{k:05d}" for k in range(3) for _ in range(7)]
        assert [int(n.split("/")[1].removesuffix(".png")) for n in names] == list(range(7)) * 3

