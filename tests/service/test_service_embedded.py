"""Embedded mode end to end: no Redis, no separate worker, the same API."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.contracts import Settings
from service_testlib import API_KEYS, SAMPLES, files_for, pid_alive, wait_job

pytestmark = pytest.mark.integration


def _embedded(data_dir, **kw) -> Settings:
    return Settings(redis_url=None, allow_open=True, data_dir=data_dir, device="cpu", checkpoint_every_s=0, lease_ttl_s=2,
                    reconcile_interval_s=0.5, **kw)


def test_congeal_demo_aligns_the_sample_over_http(tmp_path):
    """The README's first command: embedded server, real HTTP upload, results on disk."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONGEAL_")}
    env["CONGEAL_REDIS_URL"] = "redis://127.0.0.1:1/0"  # a Redis that does not exist: the demo must not need one
    env["CONGEAL_API_KEYS"] = API_KEYS  # keys meant for a real server: the local demo stays open
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "congeal", "demo", "--data-dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - t0 < 120
    # The job's progress as it went: a stage before the end, and the training's step and loss (a
    # 3-step job can load and train between two polls, so which stages are seen varies; the numbers
    # of the last step are always there).
    assert re.search(r"running, (starting|loading|training)", out.stdout) and "APSNR" in out.stdout, out.stdout
    assert re.search(r"step 3/3, loss \d", out.stdout), out.stdout
    results = list((tmp_path / "demo-results").iterdir())
    assert len(results) == 1 and str(results[0]) in out.stdout
    t = json.loads((results[0] / "transforms.json").read_text())
    assert len(t["images"]) == len(SAMPLES) == 48
    assert len(zipfile.ZipFile(results[0] / "aligned.zip").namelist()) == 49
    metrics = json.loads((results[0] / "metrics.json").read_text())
    assert metrics["apsnr_after"] > metrics["apsnr_before"]
    report = (results[0] / "report.html").read_text()
    assert report.count('class="card"') == 48 and str(results[0] / "report.html") in out.stdout


def test_embedded_job_survives_a_restart_and_resumes(tmp_path):
    s = _embedded(tmp_path)
    with TestClient(create_app(s)) as c:
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["mode"] == "embedded" and ready["store"] == "SqliteJobStore"
        # 40 epochs (one step each): stopping the server takes longer than the last few steps of a
        # short job, which then ends before it can be interrupted.
        jid = c.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "40"}).json()["id"]
        ckpt = tmp_path / "jobs" / jid / "checkpoint" / "state.json"
        j = wait_job(c, jid, timeout=180, until=lambda j: j["status"] != "queued" and ckpt.is_file()
                     and (j["attempts"][-1]["last_epoch"] or 0) >= 3 or j["status"] in ("succeeded", "failed"))
        assert j["status"] == "running", j
    # The server stopped mid-training (its child was stopped with it). Start it again:
    # the record is still there, and the job carries on from its checkpoint.
    with TestClient(create_app(s)) as c:
        done = wait_job(c, jid, timeout=180)
        listed = c.get("/jobs").json()["data"]
    assert done["status"] == "succeeded", done
    assert [a["outcome"] for a in done["attempts"]] == ["interrupted", "succeeded"]
    assert done["attempts"][1]["checkpoint_at_start"] and done["attempts"][1]["resumed_from_epoch"] >= 2
    assert done["attempts"][1]["first_epoch"] >= 2  # not started over
    assert [x["id"] for x in listed] == [jid]


def test_embedded_cancel_stops_the_training_child(tmp_path):
    from service.contracts import open_store

    s = _embedded(tmp_path)
    with TestClient(create_app(s)) as c:
        jid = c.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "500"}).json()["id"]
        j = wait_job(c, jid, until=lambda j: (j["progress"] or {}).get("stage") == "training"
                     or j["status"] in ("succeeded", "failed", "cancelled"))
        assert j["status"] == "running"
        pid = open_store(s).get(jid).attempts[-1].pid
        assert c.delete(f"/jobs/{jid}").status_code == 202
        done = wait_job(c, jid, timeout=30)
        assert done["status"] == "cancelled"
        assert not pid_alive(pid)


def test_congeal_serve_answers_on_its_port(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONGEAL_")}
    proc = subprocess.Popen([sys.executable, "-m", "congeal", "serve", "--open", "--port", str(port), "--data-dir",
                             str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    ready = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert ready["status"] == "ready" and ready["mode"] == "embedded"
        assert (tmp_path / "jobs.sqlite3").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = proc.stdout.read()
    assert "embedded" in out and "OPEN ACCESS" in out  # no keys configured: it says so


@pytest.mark.parametrize("env,says", [
    ({}, "no API keys: set CONGEAL_API_KEYS"),  # embedded
    ({"CONGEAL_REDIS_URL": "redis://127.0.0.1:6379/13"}, "no API keys: set CONGEAL_API_KEYS"),
    ({"CONGEAL_API_KEYS": "alice:raw-secret-pasted-here"}, "CONGEAL_API_KEYS: Value error"),
    ({"CONGEAL_API_KEYS": API_KEYS, "CONGEAL_RATE_LIMIT_PER_MINUTE": "-1"}, "CONGEAL_RATE_LIMIT_PER_MINUTE"),
], ids=["embedded", "redis", "malformed-key", "bad-setting"])
def test_congeal_serve_refuses_a_bad_configuration_in_one_line(tmp_path, env, says):
    """No keys (and no --open), or a setting that does not parse: one line on stderr, exit 2, no
    traceback, the bad value never echoed; and nothing listens."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONGEAL_")}
    r = subprocess.run([sys.executable, "-m", "congeal", "serve", "--port", "1", "--data-dir", str(tmp_path)],
                       env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("congeal serve: error: ") and says in lines[0], r.stderr
    assert "raw-secret" not in r.stderr and r.stdout == ""
    if "no API keys" in says:
        assert "CONGEAL_ALLOW_OPEN=true" in lines[0] and "--open" in lines[0]


def test_finished_jobs_expire_with_their_files(tmp_path):
    """Retention end to end: the runner's periodic sweep deletes a job that ended more than
    job_ttl_s ago, record and folder."""
    s = _embedded(tmp_path, job_ttl_s=1, sweep_interval_s=0.5, embedded_workers=1)
    with TestClient(create_app(s)) as c:
        jid = c.post("/jobs", files=files_for(SAMPLES[:4]), data={"budget": "500"}).json()["id"]
        assert c.delete(f"/jobs/{jid}").status_code == 202  # cancelled: queued at once, running within seconds
        wait_job(c, jid, timeout=30)
        assert (tmp_path / "jobs" / jid).is_dir()
        deadline = time.monotonic() + 15
        while c.get(f"/jobs/{jid}").status_code != 404:
            assert time.monotonic() < deadline, "the finished job was never swept"
            time.sleep(0.25)
        assert not (tmp_path / "jobs" / jid).exists()
