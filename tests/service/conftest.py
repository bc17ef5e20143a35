"""Fixtures for the service tests: real Redis, real Celery worker processes, the real app."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for service_testlib (importlib import mode)

from service_testlib import REDIS_URL, Env, Worker, auth  # noqa: E402


@pytest.fixture(scope="session")
def redis_client():
    r = redis.Redis.from_url(REDIS_URL)
    r.ping()  # no skip: CI starts Redis, and these tests are what prove the service works with it
    yield r
    r.close()


@pytest.fixture(scope="session")
def make_env(tmp_path_factory, redis_client):
    root = tmp_path_factory.mktemp("service")
    made: list[Env] = []

    def make(**overrides) -> Env:
        e = Env(root, uuid.uuid4().hex[:10], **overrides)
        made.append(e)
        return e

    yield make
    for e in made:
        e.cleanup(redis_client)


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[Worker] = []

    def start(env: Env, name: str | None = None, wait: bool = True, queues: list[str] | None = None) -> Worker:
        w = Worker(env, name or f"w{len(started)}-{env.tag}", log_dir, queues)
        started.append(w)
        if wait:
            w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def worker_env(make_env, start_worker):
    """The session's service configuration with one worker consuming its queues."""
    env = make_env()
    env.worker = start_worker(env, name=f"session-{env.tag}")
    return env


@pytest.fixture(scope="session")
def client(worker_env):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(worker_env.settings()), headers=auth()) as c:
        yield c


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path, redis_client):
    """A job store of each kind: Redis under a key prefix of its own (deleted after), or SQLite."""
    from service.contracts import RedisJobStore, SqliteJobStore

    if request.param == "redis":
        prefix = f"congeal-test-{uuid.uuid4().hex[:10]}"
        s = RedisJobStore(REDIS_URL, prefix)
        yield s
        keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
        if keys:
            redis_client.delete(*keys)
    else:
        s = SqliteJobStore(tmp_path / "jobs.sqlite3")
        yield s
    s.close()
