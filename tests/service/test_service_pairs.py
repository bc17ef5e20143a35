"""``/pairs``: pair jobs through the real job machinery (Redis, a Celery worker process, the training
child; and embedded mode), their results in the product's convention, point transfer, and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.pairwise import synthetic as S
from service.app import create_app
from service.contracts import PAIR_METHODS, JobKind, JobRecord, Settings, open_store
from service_testlib import auth, png_bytes, wait_job

pytestmark = pytest.mark.integration


def _pair(name: str, seed: int, rho: float = 8.0, patch: int = 96, modality: str | None = None):
    im = S.load_image(name, short_side=200)
    if modality is None and im.ndim == 3:
        im = im @ np.array([0.299, 0.587, 0.114], np.float32)
    p = S.homography_pair(im, np.random.default_rng(seed), patch, rho, name)
    if modality is not None:
        p.target = S.derive_modality(p.target, modality)
    return p


def _png(a: np.ndarray) -> bytes:
    return png_bytes((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def _files(**named: np.ndarray):
    return [("files", (n, _png(a), "image/png")) for n, a in named.items()]


@pytest.fixture(scope="module")
def pairs():
    return {"a": _pair("astronaut", 1), "b": _pair("coffee", 2, rho=6, modality="inverted"), "c": _pair("rocket", 3)}


def test_the_core_offers_exactly_the_pair_methods_the_api_accepts():
    from models.catalog import list_pair_methods

    assert tuple(list_pair_methods()) == PAIR_METHODS


def test_two_images_are_a_pair_job_with_the_homography_points_and_images(client, pairs):
    p = pairs["a"]
    r = client.post("/pairs", files=_files(**{"src.png": p.source, "tgt.png": p.target}),
                    data={"method": "ecc", "points": json.dumps({"target": [[10, 20], [95, 0]], "source": [[3, 4]]})})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert r.headers["location"] == f"/pairs/{job['id']}" and job["kind"] == "pair" and job["n_images"] == 2
    assert job["links"]["pairs"] == r.headers["location"] and job["options"] is None
    done = wait_job(client, job["id"], timeout=120)  # polled like any job
    assert done["status"] == "succeeded", done
    assert done["metrics"]["n_pairs"] == 1 and done["metrics"]["n_aligned"] == 1
    assert done["links"]["transforms"] is None  # the alignment-job downloads do not apply

    res = client.get(r.headers["location"]).json()
    assert res["method"] == "ecc" and "TARGET" in res["convention"] and res["n_pairs"] == 1
    (e,) = res["pairs"]
    assert e["name"] == "pair" and e["source"] == "src.png" and e["target"] == "tgt.png" and e["aligned"]
    M = np.array(e["matrix"])
    assert S.corner_error(M, p.source_from_target, (96, 96)) < 0.5
    q = np.c_[[[10, 20], [95, 0]], np.ones(2)] @ M.T
    assert np.allclose(e["points"]["target_in_source"], q[:, :2] / q[:, 2:])
    for kind in ("warped", "overlay", "checkerboard"):
        img = client.get(e["links"][kind])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content[:4] == b"\x89PNG"
    there = client.post(e["links"]["points"], json={"points": [[10, 20]], "direction": "target_to_source"}).json()
    back = client.post(e["links"]["points"], json={"points": there["points"], "direction": "source_to_target"}).json()
    assert np.allclose(there["points"], e["points"]["target_in_source"][:1])
    assert np.allclose(back["points"], [[10, 20]], atol=1e-6)
    # bodies that are not JSON points are refused, never a 500 (bytes that are not UTF-8 included)
    assert client.post(e["links"]["points"], files=_files(**{"x.png": p.source})).status_code == 415
    bad = client.post(e["links"]["points"], content=b'{"points": "\x86\xff"}', headers={"Content-Type": "application/json"})
    assert bad.status_code == 422
    assert client.post(e["links"]["points"], json={"points": [[1, 2]], "direction": "up"}).status_code == 422


def test_the_default_method_is_search_with_its_options(client, worker_env, pairs):
    """No method: ``search``, with its options as the request gave them; a +-8 px pair to under a pixel."""
    p = pairs["a"]
    r = client.post("/pairs", files=_files(**{"src.png": p.source, "tgt.png": p.target}),
                    data={"options": json.dumps({"size": 48, "refine": True})})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]["id"]
    request = json.loads((worker_env.data_dir / "jobs" / jid / "pair_request.json").read_text())
    assert request["options"]["method"] == "search"
    assert request["options"]["method_options"] == {"size": 48, "refine": True}
    assert wait_job(client, jid, timeout=120)["status"] == "succeeded"
    res = client.get(f"/pairs/{jid}").json()
    (e,) = res["pairs"]
    assert res["method"] == "search" and e["aligned"] and e["confidence"] > 0.6, e
    assert S.corner_error(np.array(e["matrix"]), p.source_from_target, (96, 96)) < 1.0


def test_learned_pairs_by_name_and_an_unalignable_pair_says_so(client, pairs):
    """Three uploads, two pairs chosen by name: a cross-modal pair (RGB against inverted intensities) the
    learned method recovers (the search, then the joint fit), and two unrelated images, reported as not
    aligned (and given no images)."""
    b, c = pairs["b"], pairs["c"]
    spec = [["rgb.png", "inv.png", "cross"], {"source": "rgb.png", "target": "other.png", "name": "unrelated",
                                               "points": {"target": [[1, 1]]}}]
    r = client.post("/pairs", files=_files(**{"rgb.png": b.source, "inv.png": b.target,
                                              "other.png": S.derive_modality(c.target, "channel")}),
                    data={"pairs": json.dumps(spec), "method": "learned",
                          "options": json.dumps({"search_steps": [40], "keypoints": 32})})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]["id"]
    assert wait_job(client, jid, timeout=400)["status"] == "succeeded"
    res = client.get(f"/pairs/{jid}").json()
    cross, unrelated = res["pairs"]
    assert (cross["name"], unrelated["name"]) == ("cross", "unrelated") and res["n_aligned"] == 1
    assert cross["aligned"] and S.corner_error(np.array(cross["matrix"]), b.source_from_target, (96, 96)) < 3
    assert not unrelated["aligned"] and unrelated["confidence"] < cross["confidence"]
    assert unrelated["points"]["target"] == [[1.0, 1.0]] and len(unrelated["points"]["target_in_source"]) == 1
    assert set(unrelated["links"]) == {"points"}
    assert client.get(f"/pairs/{jid}/unrelated/warped").status_code == 404


def test_a_running_pair_job_can_be_cancelled(client, pairs):
    """The learned method checks for a stop at every step: DELETE stops a long fit within seconds."""
    p = pairs["a"]
    r = client.post("/pairs", files=_files(**{"s.png": p.source, "t.png": p.target}),
                    data={"method": "learned", "options": json.dumps({"search_steps": [2000]})})
    jid = r.json()["job"]["id"]
    j = wait_job(client, jid, until=lambda j: (j["progress"] or {}).get("stage") == "aligning"
                 or j["status"] in ("succeeded", "failed", "cancelled"))
    assert j["status"] == "running", j
    assert client.delete(f"/jobs/{jid}").status_code == 202
    done = wait_job(client, jid, timeout=60)
    assert done["status"] == "cancelled", done
    assert client.get(f"/pairs/{jid}").json()["pairs"] is None


@pytest.fixture(scope="module")
def api(make_env):
    """An API whose queue no worker consumes: requests are checked and queued, never run."""
    env = make_env(max_pairs_per_job=2, max_jobs_in_flight_per_key=10_000)
    with TestClient(create_app(env.settings()), raise_server_exceptions=False, headers=auth()) as c:
        yield c, env


def _three(pairs):
    p = pairs["a"]
    return _files(**{"a.png": p.source, "b.png": p.target, "c.png": pairs["c"].target})


@pytest.mark.parametrize("data, status, text", [
    ({}, 422, "say which go together in 'pairs'"),
    ({"pairs": '[["a.png", "zzz.png"]]'}, 422, "'zzz.png' is not the name of an uploaded image"),
    ({"pairs": "[[a.png, b.png]]"}, 422, "JSON"),
    ({"pairs": '[["a.png"]]'}, 422, "pairs"),
    ({"pairs": '[["a.png", "b.png"], ["a.png", "c.png"], ["b.png", "c.png"]]'}, 413, "above the limit of 2"),
    ({"pairs": '[["a.png", "b.png"]]', "method": "ecc", "options": '{"starts": 2}'}, 422,
     "methods search, learned, semantic only"),
    ({"pairs": '[["a.png", "b.png"]]', "method": "learned", "options": '{"stpes": [3]}'}, 422, "stpes"),
    ({"pairs": '[["a.png", "b.png"]]', "method": "learned", "options": '{"starts": 99}'}, 422, "starts"),
    ({"pairs": '[["a.png", "b.png"]]', "options": '{"starts": 2}'}, 422, "not options of method search"),
    ({"pairs": '[["a.png", "b.png"]]', "options": '{"size": 8}'}, 422, "size"),
    ({"pairs": '[["a.png", "b.png"]]', "options": '{"candidates": 0}'}, 422, "candidates"),
    ({"pairs": '[["a.png", "b.png"]]', "options": '{"refine": "maybe"}'}, 422, "refine"),
    ({"pairs": '[["a.png", "b.png"]]', "method": "surf"}, 422, "method"),
    ({"pairs": '[["a.png", "b.png"]]', "points": '{"target": [[1, 2, 3]]}'}, 422, "points"),
    ({"pairs": '[["a.png", "b.png"]]', "warp": "affine"}, 422, "warp"),
])
def test_bad_pair_requests_are_refused_and_leave_nothing(api, pairs, data, status, text):
    c, env = api
    before = set((env.data_dir / "jobs").iterdir()) if (env.data_dir / "jobs").exists() else set()
    r = c.post("/pairs", files=_three(pairs), data=data)
    assert r.status_code == status and text in r.text, r.text
    after = set((env.data_dir / "jobs").iterdir()) if (env.data_dir / "jobs").exists() else set()
    assert after == before


def test_one_image_is_not_a_pair(api, pairs):
    c, _ = api
    r = c.post("/pairs", files=_files(**{"a.png": pairs["a"].source}))
    assert r.status_code == 422 and "at least 2" in r.text


def test_results_wait_for_success_and_other_jobs_are_not_pair_jobs(api, pairs):
    c, env = api
    r = c.post("/pairs", files=_three(pairs), data={"pairs": '[["a.png", "b.png", "x"]]'})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]["id"]
    request = json.loads((env.data_dir / "jobs" / jid / "pair_request.json").read_text())
    assert request["pairs"] == [["a.png", "b.png", "x"]]
    assert request["options"]["method"] == "search"  # the default method
    pub = c.get(f"/pairs/{jid}").json()
    assert pub["job"]["status"] == "queued" and pub["pairs"] is None
    assert c.get(f"/pairs/{jid}/x/warped").status_code == 409
    assert c.post(f"/pairs/{jid}/x/points", json={"points": [[0, 0]]}).status_code == 409
    assert c.get(f"/pairs/{jid}/x/nonsense").status_code == 422
    align = open_store(env.settings()).insert(JobRecord(id="d" * 32, kind=JobKind.align, owner="alice"))[0]
    assert c.get(f"/pairs/{align.id}").status_code == 404
    assert c.get("/pairs/" + "0" * 32).status_code == 404
    assert c.get(f"/pairs/{jid}", headers=auth("bob")).status_code == 404  # another tenant's job


def test_embedded_mode_runs_pair_jobs(tmp_path, pairs):
    p = pairs["a"]
    s = Settings(redis_url=None, allow_open=True, data_dir=tmp_path, device="cpu")
    with TestClient(create_app(s)) as c:
        r = c.post("/pairs", files=_files(**{"s.png": p.source, "t.png": p.target}), data={"method": "ecc"})
        assert r.status_code == 202, r.text
        jid = r.json()["job"]["id"]
        assert wait_job(c, jid, timeout=120)["status"] == "succeeded"
        e = c.get(f"/pairs/{jid}").json()["pairs"][0]
    assert S.corner_error(np.array(e["matrix"]), p.source_from_target, (96, 96)) < 0.5
