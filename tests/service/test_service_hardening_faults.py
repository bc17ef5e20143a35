"""Issue 21's faults, end to end against real Redis, real training children and real Celery workers.

- Only the training child is killed (the OOM killer's way): the job resumes from its checkpoint,
  like a job whose whole worker died; killed every time, it fails after ``max_attempts``.
- A worker whose lease lapsed while its child finished must not delete the checkpoint of the
  attempt that replaced it.
- A queued job whose broker message was lost is sent again; a job sent twice still runs once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
from fastapi.testclient import TestClient
from service_testlib import SAMPLES, auth, files_for, pid_alive, wait_job

from service.app import create_app
from service.contracts import ArtifactStore
from service.execution import JobRunner

pytestmark = pytest.mark.integration


def _epoch_at_least(n: int, also=lambda j: True):
    def until(j):
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return True
        return (j["status"] == "running" and bool(j["attempts"]) and (j["attempts"][-1]["last_epoch"] or 0) >= n
                and also(j))
    return until


def _kill_child(env, jid: str) -> int:
    pid = env.store().get(jid).attempts[-1].pid
    assert pid and pid_alive(pid)
    os.kill(pid, signal.SIGKILL)  # the child only: its worker lives on
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def test_a_killed_training_child_resumes_from_its_checkpoint(make_env, start_worker):
    env = make_env()
    worker = start_worker(env, name="keeper")
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        # 40 epochs: long enough that the job is still training when the poll sees epoch 3 (a 5-epoch job
        # could end between the poll and the kill once the trainer got faster)
        jid = api.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "40"}).json()["id"]
        state = env.data_dir / "jobs" / jid / "checkpoint" / "state.json"
        running = wait_job(api, jid, until=_epoch_at_least(3, lambda j: state.is_file()), timeout=180)
        assert running["status"] == "running", running
        saved_epoch = json.loads(state.read_text())["epoch"]
        _kill_child(env, jid)
        done = wait_job(api, jid, timeout=240)
    assert worker.proc.poll() is None  # the worker itself was never touched
    assert done["status"] == "succeeded", done
    a1, a2 = done["attempts"][0], done["attempts"][-1]
    assert len(done["attempts"]) == 2, done["attempts"]
    assert a1["outcome"] == "lost" and "SIGKILL" in a1["detail"], a1
    assert a2["outcome"] == "succeeded" and a2["checkpoint_at_start"]
    assert a2["resumed_from_epoch"] >= saved_epoch >= 2 and a2["first_epoch"] == a2["resumed_from_epoch"]
    assert done["progress"]["step"] == done["progress"]["total"] == 40


def test_a_child_killed_every_time_fails_after_max_attempts(make_env, start_worker):
    env = make_env(max_attempts=1)
    start_worker(env, name="keeper1")
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        jid = api.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "50"}).json()["id"]
        assert wait_job(api, jid, until=_epoch_at_least(1), timeout=180)["status"] == "running"
        _kill_child(env, jid)
        done = wait_job(api, jid, timeout=60)
    assert done["status"] == "failed" and done["error_type"] == "lost", done
    assert "SIGKILL" in done["error"] and "limit 1" in done["error"] and "\n" not in done["error"], done["error"]
    assert [a["outcome"] for a in done["attempts"]] == ["lost"]


def test_a_worker_that_lost_its_lease_keeps_its_hands_off_the_new_attempts_checkpoint(make_env):
    # The race, made certain: worker "old" holds the job and its child is training; its lease
    # is taken over (it lapsed: a long GC pause, a network partition) by worker "new", which
    # has started writing its own checkpoint; then old's child finishes before old renews
    # (every lease_ttl_s / 3 = 20 s here) and notices.
    env = make_env(lease_ttl_s=60)
    settings = env.settings()
    store, arts = env.store(), ArtifactStore(env.data_dir)
    with TestClient(create_app(settings), headers=auth()) as api:  # no worker on this env's queue
        jid = api.post("/jobs", files=files_for(SAMPLES[:6]), data={"method": "lsc", "budget": "2"}).json()["id"]
    old = JobRunner(store, arts, settings, name="old")
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=old.run(jid)), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not (store.get(jid).attempts and store.get(jid).attempts[-1].pid):
        assert time.monotonic() < deadline, store.get(jid)
        time.sleep(0.05)
    time.sleep(1.0)  # old has renewed once (its first poll); the next renewal is 20 s away
    store.update(jid, lambda r: r.model_copy(update={"lease_expires_at": time.time() - 1}))
    claim = store.claim(jid, "new", lease_ttl_s=60, max_attempts=3)
    assert claim.run and claim.record.lease_owner == "new"
    ckpt = arts.checkpoint_dir(jid)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "new-attempt.bin").write_bytes(b"the new attempt resumes from this")
    t.join(timeout=120)
    assert not t.is_alive()
    # old's child finished normally (so this is the race, not old noticing and killing it) ...
    assert out["result"] == "abandoned: lease lost before the result was recorded", out
    # ... and the new attempt's checkpoint and record are untouched.
    assert (ckpt / "new-attempt.bin").read_bytes() == b"the new attempt resumes from this"
    rec = store.get(jid)
    assert rec.status.value == "running" and rec.lease_owner == "new" and rec.attempts[-1].worker == "new"
    assert rec.attempts[0].outcome == "lost"


def _drop_queue(env, r) -> None:
    """The broker forgets every message of the env's training queue (a Redis crash inside the
    append-only file's fsync window loses the last writes)."""
    r.delete(env.vars["CONGEAL_QUEUE"])


def test_a_lost_broker_message_is_sent_again_and_a_job_sent_twice_runs_once(make_env, start_worker, redis_client):
    env = make_env(requeue_queued_after_s=2)
    q = env.vars["CONGEAL_QUEUE"]
    # A worker that consumes another queue: it beats and leads the reconciler, runs nothing here.
    start_worker(env, name="janitor", queues=[f"{q}.elsewhere"])
    store = env.store()
    with TestClient(create_app(env.settings()), headers=auth()) as api:
        lost = api.post("/jobs", files=files_for(SAMPLES[:6]), data={"method": "lsc", "budget": "2"}).json()["id"]
        assert store.get(lost).enqueued_at is not None  # sent, and marked sent
        _drop_queue(env, redis_client)
        kept = api.post("/jobs", files=files_for(SAMPLES[:6]), data={"method": "lsc", "budget": "2"}).json()["id"]
        deadline = time.monotonic() + 30
        # getattr: on a store without re-sends the loop times out showing both records still queued.
        while not (getattr(store.get(lost), "resent", 0) >= 1 and getattr(store.get(kept), "resent", 0) >= 1):
            assert time.monotonic() < deadline, (store.get(lost), store.get(kept))
            time.sleep(0.2)
        # 'kept' now has two messages in the queue (its own and the re-send), 'lost' one.
        assert redis_client.llen(q) >= 3
        workers = [start_worker(env, name=f"runner{i}", wait=False) for i in range(2)]
        for w in workers:
            w.wait_ready()
        done = {j: wait_job(api, j, timeout=240) for j in (lost, kept)}
    for j, rec in done.items():
        assert rec["status"] == "succeeded", rec
        assert len(rec["attempts"]) == 1, rec["attempts"]  # run once, never twice at once
    logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
    for j in (lost, kept):
        assert len(re.findall(rf"job {j}: attempt 1,", logs)) == 1, logs[-3000:]
    # Each duplicate delivery was refused by the claim: the job was running (a live lease) or done.
    refused = re.findall(rf"job {kept}: not running it \((running on \S+|already succeeded)\)", logs)
    assert refused, logs[-3000:]
