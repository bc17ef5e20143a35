"""Per-tenant limits against real Redis: jobs in flight, and the request rate kept in Redis."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from service_testlib import SAMPLES, auth, files_for

from service.app import create_app


@pytest.fixture(scope="module")
def env(make_env):
    # No worker on these queues: jobs stay queued, so they stay in flight until cancelled.
    return make_env(max_jobs_in_flight_per_key=2, rate_limit_per_minute=8)


def test_jobs_in_flight_per_key(env):
    with TestClient(create_app(env.settings(rate_limit_per_minute=0))) as c:
        a = [c.post("/jobs", files=files_for(SAMPLES[:2]), headers=auth("alice")) for _ in range(2)]
        assert [r.status_code for r in a] == [202, 202]
        jobs_dir = env.data_dir / "jobs"
        before = set(jobs_dir.iterdir())
        r = c.post("/jobs", files=files_for(SAMPLES[:2]), headers=auth("alice"))
        assert r.status_code == 429 and "at most 2" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
        assert set(jobs_dir.iterdir()) == before  # refused before the upload was stored
        assert c.post("/jobs", files=files_for(SAMPLES[:2]), headers=auth("bob")).status_code == 202  # per key
        assert c.delete(f"/jobs/{a[0].json()['id']}", headers=auth("alice")).status_code == 202
        assert c.post("/jobs", files=files_for(SAMPLES[:2]), headers=auth("alice")).status_code == 202


def test_request_rate_per_key_is_counted_in_redis(env, redis_client):
    with TestClient(create_app(env.settings())) as c, TestClient(create_app(env.settings())) as other_api:
        # Two API instances share one sliding window: the limit holds across replicas, and
        # exactly (no boundary where two windows' budgets add up).
        codes = [(c if i % 2 else other_api).get("/jobs", headers=auth("alice")) for i in range(20)]
        assert [r.status_code for r in codes] == [200] * 8 + [429] * 12, [r.status_code for r in codes]
        limited = codes[8]
        assert 1 <= int(limited.headers["retry-after"]) <= 60 and "rate limit" in limited.json()["detail"]
        assert c.get("/jobs", headers=auth("bob")).status_code == 200  # bob has his own budget
        assert c.get("/healthz").status_code == 200  # probes are not rate limited
    prefix = env.vars["CONGEAL_KEY_PREFIX"]
    key = f"{prefix}:rate:req:alice"
    assert redis_client.zcard(key) == 8  # refused requests are not recorded
    assert 0 < redis_client.ttl(key) <= 61


def test_the_window_slides(env, redis_client):
    # Requests older than the window stop counting: made old by rewriting their times.
    key = f"{env.vars['CONGEAL_KEY_PREFIX']}:rate:req:bob"
    redis_client.delete(key)  # whatever bob did in the other tests
    with TestClient(create_app(env.settings())) as c:
        assert all(c.get("/jobs", headers=auth("bob")).status_code == 200 for _ in range(8))
        assert c.get("/jobs", headers=auth("bob")).status_code == 429
        times = redis_client.zrange(key, 0, -1, withscores=True)
        redis_client.zadd(key, {m: t - 61 for m, t in times[:3]})  # three of them a minute old
        assert [c.get("/jobs", headers=auth("bob")).status_code for _ in range(4)] == [200] * 3 + [429]


def test_embedded_mode_rate_limit_in_memory(tmp_path):
    from service.contracts import Settings

    s = Settings(redis_url=None, allow_open=True, data_dir=tmp_path, rate_limit_per_minute=3, device="cpu")
    with TestClient(create_app(s)) as c:
        codes = [c.get("/jobs").status_code for _ in range(8)]
    assert codes == [200] * 3 + [429] * 5, codes
