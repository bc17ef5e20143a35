"""Faults end to end, with real Redis servers and real worker processes.

- Redis restarted (SIGKILL, append-only file on) mid-job, and the API restarted: the record is
  intact and the job finishes.
- A worker vanishes and its broker message is gone too (no redelivery): the lease/heartbeat
  reconciler requeues the job; its checkpoint was corrupted meanwhile, so it restarts from
  scratch and says so in the job record.
- A job whose workers keep vanishing fails with a reason instead of staying ``running``.
(A worker killed with redelivery and a good checkpoint: ``test_service_recovery.py``.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
import redis
from fastapi.testclient import TestClient
from service_testlib import SAMPLES, auth, files_for, wait_job

from service.app import create_app

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of the test's own, on loopback, with its append-only file in ``dir``."""

    def __init__(self, dir, port: int):
        self.dir, self.port = dir, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                return self
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no shutdown save: only the append-only file survives
        self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def own_redis(tmp_path):
    r = OwnRedis(tmp_path, _free_port()).start()
    yield r
    if r.proc.poll() is None:
        r.proc.terminate()
        r.proc.wait(timeout=10)


def _training(epoch: int):
    def until(j):
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return True
        return j["status"] == "running" and bool(j["attempts"]) and (j["attempts"][-1]["last_epoch"] or 0) >= epoch
    return until


def test_redis_restart_and_api_restart_mid_job(make_env, start_worker, own_redis):
    env = make_env(redis_url=own_redis.url)
    start_worker(env, name="survivor")
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        jid = api.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "6"}).json()["id"]
        before = wait_job(api, jid, until=_training(2), timeout=180)
        assert before["status"] == "running", before
    # The API is gone; now Redis dies too, hard, mid-training, and stays down a moment.
    own_redis.kill()
    time.sleep(2)
    own_redis.start()
    with TestClient(create_app(env.settings()), headers=auth()) as api:  # a new API process
        again = api.get(f"/jobs/{jid}").json()
        assert again["created_at"] == before["created_at"] and again["options"] == before["options"]
        assert again["status"] in ("running", "queued", "succeeded"), again
        done = wait_job(api, jid, timeout=240)
        assert jid in [j["id"] for j in api.get("/jobs").json()["data"]]
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == done["progress"]["total"] == 6
    assert done["metrics"]["apsnr_after"] > 0


def _drop_broker_messages(env, r: redis.Redis) -> None:
    """The broker forgets the job: its queued and unacknowledged messages are deleted, so
    only the job store's lease can bring it back."""
    q = env.vars["CONGEAL_QUEUE"]
    for tag, val in r.hscan_iter("unacked"):
        if q.encode() in val:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)
    r.delete(q)


def test_vanished_worker_without_redelivery_is_requeued_by_its_lease_and_a_corrupt_checkpoint_restarts(
        make_env, start_worker, redis_client):
    env = make_env()
    doomed = start_worker(env, name="vanishing")
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        # 40 epochs: still training when the poll sees epoch 2 and a checkpoint (a 4-epoch job could end first)
        jid = api.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "40"}).json()["id"]
        ckpt = env.data_dir / "jobs" / jid / "checkpoint"
        running = wait_job(api, jid, until=lambda j: _training(2)(j) and any(ckpt.glob("*.safetensors")),
                           timeout=180)
        assert running["status"] == "running", running
        doomed.kill()
        _drop_broker_messages(env, redis_client)
        for f in ckpt.iterdir():  # a disk error while it died: every checkpoint file is garbage
            f.write_bytes(os.urandom(64))
        # The record still says running: only the lease tells it is orphaned.
        assert api.get(f"/jobs/{jid}").json()["status"] == "running"
        start_worker(env, name="janitor")
        done = wait_job(api, jid, timeout=240)
    assert done["status"] == "succeeded", done
    a1, a2 = done["attempts"][0], done["attempts"][-1]
    assert a1["outcome"] == "lost" and a1["worker"].startswith("vanishing@")
    assert a2["worker"].startswith("janitor@") and a2["checkpoint_at_start"] and not a2["resumed_from_epoch"]
    assert any(n.startswith("checkpoint unreadable") and "started from scratch" in n
               for n in done["metrics"]["notes"]), done["metrics"]["notes"]
    assert a2["first_epoch"] == 1  # really from scratch


def test_a_job_whose_workers_keep_vanishing_fails_with_a_reason(make_env, start_worker, redis_client):
    env = make_env(max_attempts=1)
    doomed = start_worker(env, name="flaky")
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        jid = api.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "50"}).json()["id"]
        assert wait_job(api, jid, until=_training(1), timeout=180)["status"] == "running"
        doomed.kill()
        _drop_broker_messages(env, redis_client)
        start_worker(env, name="successor")
        done = wait_job(api, jid, timeout=60)
    assert done["status"] == "failed" and done["error_type"] == "lost", done
    assert done["error"] and "\n" not in done["error"]
    assert done["attempts"][0]["outcome"] == "lost"
