"""The HTTP API against real Redis, with no worker on its queue (jobs stay queued).

Every bad request gets a 4xx whose message names the problem, never a 500,
and the service keeps serving afterwards.
"""
from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service_testlib import SAMPLES, auth, files_for, png_bytes


@pytest.fixture(scope="module")
def env(make_env):
    # No worker consumes this queue, so jobs pile up: the in-flight limit is tested on its own.
    return make_env(max_upload_bytes=200_000, max_pixels_per_image=10_000, max_budget=50,
                    max_jobs_in_flight_per_key=10_000)


@pytest.fixture(scope="module")
def api(env):
    with TestClient(create_app(env.settings()), raise_server_exceptions=False, headers=auth()) as c:
        yield c


def _ok_files(n=3):
    return files_for(SAMPLES[:n])


def _detail(r) -> str:
    return str(r.json()["detail"])


def _job_dirs(env) -> set[str]:
    d = env.data_dir / "jobs"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def test_health_and_readiness_without_a_worker(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    r = api.get("/readyz")
    assert r.status_code == 503 and r.json()["mode"] == "redis" and "no worker" in r.json()["detail"]


def test_valid_upload_is_accepted_at_once_and_stays_queued(api, env):
    r = api.post("/jobs", files=_ok_files(), data={"warp": "affine", "budget": "3", "seed": "7"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["links"]["self"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["n_images"] == 3
    assert job["options"]["warp"] == "affine" and job["options"]["budget"] == 3 and job["options"]["seed"] == 7
    assert job["links"]["transforms"] is None  # no results before success
    stored = sorted(p.name for p in (env.data_dir / "jobs" / job["id"] / "input").iterdir())
    assert stored == [p.name for p in SAMPLES[:3]]
    assert api.get(job["links"]["self"]).json()["status"] == "queued"


BAD = [
    # (what, request kwargs, status, text the message must contain)
    ("no files", dict(content=b'--b0\r\nContent-Disposition: form-data; name="budget"\r\n\r\n2\r\n--b0--\r\n',
                      headers={"Content-Type": "multipart/form-data; boundary=b0"}), 422, "no files"),
    ("an empty multipart body", dict(content=b"--b0--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b0"}),
     422, "no files"),
    ("a truncated multipart body", dict(
        content=b'--b0\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=b0"}), 400, "malformed multipart"),
    ("not multipart", dict(json={"budget": 2}), 415, "multipart/form-data"),
    ("a url-encoded form", dict(data={"budget": "2"}), 415, "multipart/form-data"),
    ("a non-image", dict(files=[("files", ("notes.txt", b"hello", "text/plain"))]), 422, "notes.txt"),
    ("a corrupt image", dict(files=_ok_files(2) + [("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"))]),
     422, "broken.png"),
    ("a truncated image", dict(files=_ok_files(2) + [("files", ("cut.png", SAMPLES[5].read_bytes()[:120], "image/png"))]),
     422, "cut.png"),
    ("an unknown option", dict(files=_ok_files(), data={"colour": "red"}), 422, "colour"),
    ("a bad option value", dict(files=_ok_files(), data={"warp": "spiral"}), 422, "warp"),
    ("a budget below 1", dict(files=_ok_files(), data={"budget": "0"}), 422, "budget"),
    ("a budget above the service's", dict(files=_ok_files(), data={"budget": "51"}), 422, "budget"),
    ("a non-numeric seed", dict(files=_ok_files(), data={"seed": "abc"}), 422, "seed"),
    ("too many DeSTNet passes", dict(files=_ok_files(), data={"passes": "9"}), 422, "passes"),
    ("a negative moment weight", dict(files=_ok_files(), data={"moment_weight": "-1"}), 422, "moment_weight"),
    ("a dprc option for another method", dict(files=_ok_files(), data={"method": "lsc", "passes": "2"}), 422,
     "apply to method dprc only"),
    ("an unknown reference", dict(files=_ok_files(), data={"reference": "nope.png"}), 422, "nope.png"),
    ("one image", dict(files=_ok_files(1)), 422, "at least 2"),
    ("an image above the pixel limit",
     dict(files=_ok_files(2) + [("files", ("huge.png", png_bytes(np.zeros((200, 200), np.uint8)), "image/png"))]),
     413, "huge.png"),
    ("an upload above the byte limit", dict(files=[("files", ("big.png", b"\0" * 300_000, "image/png"))]),
     413, "limit"),
    ("a duplicate file name", dict(files=_ok_files(2) + _ok_files(1)), 422, "uploaded twice"),
    ("an unknown file field", dict(files=[("images", ("a.png", SAMPLES[0].read_bytes(), "image/png"))]), 422, "images"),
    ("a hidden file name", dict(files=[("files", (".a.png", SAMPLES[0].read_bytes(), "image/png"))]), 422, ".a.png"),
]


@pytest.mark.parametrize("what,kwargs,status,text", BAD, ids=[b[0] for b in BAD])
def test_bad_upload_gets_a_4xx_naming_the_problem(api, env, what, kwargs, status, text):
    before = _job_dirs(env)
    r = api.post("/jobs", **kwargs)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert text in _detail(r), (what, r.text)
    assert _job_dirs(env) == before  # nothing half-uploaded is left in the artifact store
    assert api.get("/healthz").status_code == 200


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_upload_is_accepted_with_names_from_the_archive(api):
    z = _zip({f"digits/{p.name}": p.read_bytes() for p in SAMPLES[:4]})
    r = api.post("/jobs", files=[("files", ("set.zip", z, "application/zip"))],
                 data={"reference": f"digits/{SAMPLES[1].name}"})
    assert r.status_code == 202, r.text
    assert r.json()["n_images"] == 4 and r.json()["options"]["reference"] == f"digits/{SAMPLES[1].name}"


def test_tar_upload_is_accepted(api):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in SAMPLES[:3]:
            tf.add(p, arcname=p.name)
    r = api.post("/jobs", files=[("files", ("set.tar.gz", buf.getvalue(), "application/gzip"))])
    assert r.status_code == 202, r.text
    assert r.json()["n_images"] == 3


@pytest.mark.parametrize("members,status,text", [
    ({"../evil.png": SAMPLES[0].read_bytes(), "a.png": SAMPLES[1].read_bytes()}, 422, "evil.png"),
    ({"a.png": SAMPLES[0].read_bytes(), "sub/bad.png": b"garbage"}, 422, "sub/bad.png"),
    ({"readme.txt": b"no images here"}, 422, "no images"),
], ids=["path traversal", "corrupt member", "no images"])
def test_bad_archive_gets_a_4xx_naming_the_member(api, members, status, text):
    r = api.post("/jobs", files=[("files", ("set.zip", _zip(members), "application/zip"))])
    assert r.status_code == status and text in _detail(r), r.text


def test_archive_plus_images_is_refused(api):
    z = _zip({p.name: p.read_bytes() for p in SAMPLES[:2]})
    r = api.post("/jobs", files=[("files", ("set.zip", z, "application/zip"))] + _ok_files(2))
    assert r.status_code == 422 and "not both" in _detail(r)


def test_unknown_or_malformed_job_ids_are_404(api):
    for jid in ("0" * 32, "nope", "..%2E%2E"):
        for path in (f"/jobs/{jid}", f"/jobs/{jid}/transforms", f"/models/{jid}"):
            r = api.get(path)
            assert r.status_code == 404 and "no " in _detail(r), (path, r.text)
        assert api.delete(f"/jobs/{jid}").status_code == 404
    assert api.get("/jobs/..%2F..%2Fetc%2Fpasswd").status_code == 404  # not even routed
    assert api.post(f"/models/{'0' * 32}/align", files=_ok_files(1)).status_code == 404


def test_results_of_an_unfinished_job_are_409(api):
    job = api.post("/jobs", files=_ok_files()).json()
    for what in ("transforms", "metrics", "aligned.zip", "images/mean_after", f"aligned/{SAMPLES[0].name}"):
        r = api.get(f"/jobs/{job['id']}/{what}")
        assert r.status_code == 409 and "queued" in _detail(r), (what, r.text)
    r = api.get(f"/jobs/{job['id']}/images/mean_sideways")
    assert r.status_code == 422 and "image" in r.text
    r = api.post(f"/models/{job['id']}/align", files=_ok_files(1))
    assert r.status_code == 409 and "queued" in _detail(r)


def test_idempotency_key_returns_the_same_job(api, env):
    h = {"Idempotency-Key": "retry-me-123"}
    a = api.post("/jobs", files=_ok_files(), headers=h)
    before = _job_dirs(env)
    b = api.post("/jobs", files=_ok_files(), headers=h)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"] and b.headers.get("idempotent-replayed") == "true"
    assert _job_dirs(env) == before
    c = api.post("/jobs", files=_ok_files(), headers={"Idempotency-Key": "another"})
    assert c.json()["id"] != a.json()["id"]
    r = api.post("/jobs", files=_ok_files(), headers={"Idempotency-Key": "x" * 201})
    assert r.status_code == 422 and "idempotency-key" in r.text.lower()
    # The same key on another kind of request is refused, not answered with the wrong job.
    from service.contracts import JobKind, JobRecord, JobStatus

    store = env.store()
    model = JobRecord(id="e" * 32, kind=JobKind.align, owner="alice", status=JobStatus.succeeded,
                      result={"n_images": 3, "has_model": True})
    store.insert(model)
    (env.data_dir / "jobs" / model.id / "output" / "model").mkdir(parents=True)
    (env.data_dir / "jobs" / model.id / "output" / "model" / "pipeline.json").write_text("{}")
    r = api.post(f"/models/{model.id}/align", files=_ok_files(1), headers=h)
    assert r.status_code == 422 and "another request" in r.text


def test_list_is_newest_first_and_paginated(api):
    ids = [api.post("/jobs", files=_ok_files(2)).json()["id"] for _ in range(3)]
    page = api.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["total"] >= 3 and page["next"] == "/jobs?offset=2&limit=2"
    nxt = api.get(page["next"]).json()
    assert nxt["data"][0]["id"] == ids[0]
    assert api.get("/jobs", params={"limit": 0}).status_code == 422
    r = api.get("/jobs", params={"limit": 1000})
    assert r.status_code == 422 and "at most" in r.text


def test_cancel_a_queued_job(api, env):
    job = api.post("/jobs", files=_ok_files()).json()
    r = api.delete(f"/jobs/{job['id']}")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None and r.json()["links"]["cancel"] is None
    # Its task is still in the broker; when a worker takes it, it must not run.
    from service.execution import JobRunner

    assert JobRunner(env.store(), None, env.settings()).run(job["id"]).startswith("skipped")
    # DELETE on a job that has ended purges it: record, uploads, everything.
    assert (env.data_dir / "jobs" / job["id"] / "input").is_dir()
    again = api.delete(f"/jobs/{job['id']}")
    assert again.status_code == 204 and not again.content
    assert not (env.data_dir / "jobs" / job["id"]).exists() and env.store().get(job["id"]) is None
    assert api.get(f"/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in api.get("/jobs", params={"limit": 100}).json()["data"]]
    assert api.delete(f"/jobs/{job['id']}").status_code == 404


def test_openapi_documents_the_upload_and_every_endpoint(api):
    spec = api.get("/openapi.json").json()
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"files", "method", "warp", "reference", "budget", "seed"} <= set(body["properties"])
    assert body["properties"]["warp"]["enum"] == ["translation", "similarity", "affine", "homography"]
    paths = set(spec["paths"])
    for p in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/transforms", "/jobs/{job_id}/aligned.zip",
              "/jobs/{job_id}/aligned/{name}", "/jobs/{job_id}/images/{image}", "/models/{model_id}/align",
              "/healthz", "/readyz"):
        assert p in paths, p
    assert "delete" in spec["paths"]["/jobs/{job_id}"]


def test_an_unexpected_error_is_a_json_500_and_the_service_keeps_serving(env):
    from service.deps import get_owner

    app = create_app(env.settings())

    def broken_owner():
        raise RuntimeError("simulated bug")

    app.dependency_overrides[get_owner] = broken_owner
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/jobs")
        assert r.status_code == 500 and r.json()["detail"] == "internal server error" and r.json()["error_id"]
        assert c.get("/healthz").status_code == 200


def test_job_records_survive_an_api_restart(api, env):
    job = api.post("/jobs", files=_ok_files()).json()
    with TestClient(create_app(env.settings()), headers=auth()) as fresh:  # a new API process would see the same
        again = fresh.get(f"/jobs/{job['id']}")
        assert again.status_code == 200 and again.json()["created_at"] == job["created_at"]
        assert job["id"] in [j["id"] for j in fresh.get("/jobs", params={"limit": 100}).json()["data"]]


# ---------------------------------------------------------------------- tenants


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"},
                                     {"X-API-Key": "ak-alice-5f0c2e9b7d4a41c"}])  # one character short
def test_missing_or_wrong_key_is_401(env, headers):
    with TestClient(create_app(env.settings())) as c:
        for method, path in (("get", "/jobs"), ("get", "/jobs/0123456789abcdef0123456789abcdef"),
                             ("post", "/jobs"), ("get", "/models/0123456789abcdef0123456789abcdef")):
            r = getattr(c, method)(path, headers=headers)
            assert r.status_code == 401 and "API key" in _detail(r), (path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/healthz").status_code == 200  # probes need no key


def test_another_tenants_job_is_404_and_invisible(api, env):
    from service_testlib import KEYS

    job = api.post("/jobs", files=_ok_files()).json()
    assert env.store().get(job["id"]).owner == "alice"
    bob = {"Authorization": f"Bearer {KEYS['bob']}"}
    for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/transforms", f"/models/{job['id']}"):
        r = api.get(path, headers=bob)
        assert r.status_code == 404 and job["id"] in _detail(r), path
    assert api.delete(f"/jobs/{job['id']}", headers=bob).status_code == 404
    assert api.post(f"/models/{job['id']}/align", files=_ok_files(1), headers=bob).status_code == 404
    assert job["id"] not in [j["id"] for j in api.get("/jobs", params={"limit": 100}, headers=bob).json()["data"]]
    assert api.get(f"/jobs/{job['id']}").json()["status"] == "queued"  # bob's cancel did nothing
    with TestClient(create_app(env.settings())) as c:  # the other header form, no default header
        assert c.get(f"/jobs/{job['id']}", headers={"X-API-Key": KEYS["alice"]}).status_code == 200
        assert c.get(f"/jobs/{job['id']}", headers={"X-API-Key": KEYS["bob"]}).status_code == 404


def test_redis_mode_refuses_to_start_open(env):
    with pytest.raises(RuntimeError, match="CONGEAL_API_KEYS"):
        with TestClient(create_app(env.settings(api_keys=None))):
            pass
    with TestClient(create_app(env.settings(api_keys=None, allow_open=True))) as c:
        assert c.get("/jobs").status_code == 200


def test_malformed_key_config_is_refused_without_echoing_it(env):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        env.settings(api_keys="alice:not-a-hash-but-a-raw-secret")
    assert "raw-secret" not in str(e.value)
