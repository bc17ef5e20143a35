"""A worker SIGKILLed mid-training loses no job: the job resumes from its checkpoint."""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service_testlib import SAMPLES, auth, files_for, pid_alive, wait_job

pytestmark = pytest.mark.integration


# Long enough that the job cannot finish between the poll that sees epoch 3 and the kill: with 12
# epochs (~1 s on an idle CPU) a fresh-clone CI run once found the checkpoint at epoch 12.
EPOCHS = 60


def test_killed_worker_job_resumes_from_its_checkpoint(make_env, start_worker):
    env = make_env()  # its own queues: killing this worker disturbs no other test
    first = start_worker(env, name="doomed")
    with TestClient(create_app(env.settings()), headers=auth()) as client:
        jid = client.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": str(EPOCHS)}).json()["id"]
        state = env.data_dir / "jobs" / jid / "checkpoint" / "state.json"

        def has_checkpoint(j):
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return True
            # Epoch 3 under way: the checkpoint holds epoch 2 at least, so a resumed run
            # is told apart from a fresh one by where it starts.
            return j["status"] == "running" and state.is_file() and (j["attempts"][-1]["last_epoch"] or 0) >= 3

        wait_job(client, jid, until=lambda j: j["status"] != "queued", timeout=120)
        # A second worker on the same queues, idle while the first one trains: the
        # usual deployment, and its start-up overlaps the training.
        start_worker(env, name="rescuer")
        running = wait_job(client, jid, until=has_checkpoint, timeout=180)
        assert running["status"] == "running", running
        child = env.store().get(jid).attempts[-1].pid
        assert child and pid_alive(child)

        first.kill()  # SIGKILL to the worker's process group: no warm shutdown, no ack, no cleanup
        saved_epoch = json.loads(state.read_text())["epoch"]
        assert 2 <= saved_epoch < EPOCHS
        deadline = time.monotonic() + 5
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child), "the training child outlived its worker"
        done = wait_job(client, jid, timeout=240)

    assert done["status"] == "succeeded", done
    a1, a2 = done["attempts"][0], done["attempts"][-1]
    assert len(done["attempts"]) == 2, done["attempts"]
    assert a1["worker"].startswith("doomed@") and a1["outcome"] == "lost" and a1["first_epoch"] == 1
    assert a2["worker"].startswith("rescuer@") and a2["outcome"] == "succeeded"
    assert a2["checkpoint_at_start"]
    # The second attempt started where the checkpoint left off, not at epoch 1.
    assert a2["resumed_from_epoch"] >= saved_epoch >= 2 and a2["first_epoch"] == a2["resumed_from_epoch"]
    assert any(n.startswith("resumed from checkpoint at step") for n in done["metrics"]["notes"])
    assert done["progress"]["step"] == done["progress"]["total"] == EPOCHS  # 16 images a step: one a epoch
