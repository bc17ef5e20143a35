"""The spare training child (``CONGEAL_WARM_CHILD``): started as a job starts, its imports done by
the next job, which then runs in it; a spare that died is replaced by a fresh child, and a runner
that closes ends its spare. Real Redis, real training children."""
from __future__ import annotations

import os
import signal
import time

import pytest
from fastapi.testclient import TestClient
from service_testlib import SAMPLES, auth, files_for, pid_alive

from service.app import create_app
from service.contracts import ArtifactStore
from service.execution import JobRunner

pytestmark = pytest.mark.integration


def _queue_jobs(env, n: int) -> list[str]:
    with TestClient(create_app(env.settings()), headers=auth()) as api:  # no worker on this env's queue
        return [api.post("/jobs", files=files_for(SAMPLES[:6]), data={"method": "lsc", "budget": "2"}).json()["id"]
                for _ in range(n)]


def _wait_loaded(pid: int, timeout: float = 60) -> None:
    """Until the spare has imported torch (its memory map names libtorch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/maps") as f:
            if "libtorch" in f.read():
                return
        time.sleep(0.2)
    raise TimeoutError(f"spare {pid} did not load torch in {timeout} s")


def test_the_next_job_runs_in_the_spare_and_a_dead_spare_is_replaced(make_env):
    env = make_env()
    store = env.store()
    runner = JobRunner(store, ArtifactStore(env.data_dir), env.settings(), name="warm")
    pids: dict[str, int] = {}  # the child each job ran in, as the runner reports it to the store
    report = store.report

    def record(job_id, worker, progress, **kw):
        if kw.get("pid"):
            pids[job_id] = kw["pid"]
        return report(job_id, worker, progress, **kw)

    store.report = record
    first, second, third = _queue_jobs(env, 3)
    try:
        assert runner.run(first) == "succeeded"
        spare = runner._spare.proc.pid
        assert pid_alive(spare) and spare != pids[first]
        _wait_loaded(spare)
        assert runner.run(second) == "succeeded"
        assert pids[second] == spare  # the job ran in the process started ahead
        # A spare that died (killed here, as the OOM killer might) is replaced by a fresh child.
        dead = runner._spare.proc.pid
        os.kill(dead, signal.SIGKILL)
        runner._spare.proc.wait()
        assert runner.run(third) == "succeeded"
        assert pids[third] not in (dead, spare)
    finally:
        last = runner._spare.proc.pid if runner._spare else None
        runner.close()
    assert runner._spare is None and (last is None or not pid_alive(last))


def test_without_warm_child_no_spare_is_started(make_env):
    env = make_env(warm_child=False)
    runner = JobRunner(env.store(), ArtifactStore(env.data_dir), env.settings(), name="cold")
    (jid,) = _queue_jobs(env, 1)
    assert runner.run(jid) == "succeeded" and runner._spare is None
