"""What an operator sees: /metrics after a real job (real Redis, a real Celery worker), structured
log lines naming the job and the request in the API and the worker, and Celery task events."""
from __future__ import annotations

import io
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.contracts.logs import StructuredFormatter, log_context
from service.devserver import free_port
from service_testlib import REDIS_URL, SAMPLES, auth, files_for, wait_job

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``(sample name, labels) -> value`` of a Prometheus exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(samples, name, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _logfmt(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(line) if "=" in tok)


class _Events:
    """Celery task events from the broker, as a monitor such as Flower receives them."""

    def __init__(self):
        from celery import Celery

        self.got: list[dict] = []
        self.app = Celery("congeal-test-monitor", broker=REDIS_URL, set_as_current=False)
        self.conn = self.app.connection_for_read()
        self.recv = self.app.events.Receiver(self.conn, handlers={"*": self.got.append})
        self.thread = threading.Thread(target=self.recv.capture, kwargs={"limit": None, "timeout": None},
                                       daemon=True)
        self.thread.start()

    def wait_listening(self, timeout: float = 30) -> None:
        # Workers send a heartbeat event every 2 s: the first one received means we are subscribed.
        deadline = time.monotonic() + timeout
        while not self.got:
            assert time.monotonic() < deadline, "no Celery event received: are worker events on?"
            time.sleep(0.1)

    def close(self) -> None:
        self.recv.should_stop = True
        self.thread.join(timeout=10)
        self.conn.release()
        self.app.close()


def test_metrics_logs_and_task_events_after_a_real_job(make_env, start_worker):
    env = make_env()
    worker = start_worker(env)
    events = _Events()
    try:
        events.wait_listening()
        rid = f"req-{uuid.uuid4().hex[:12]}"
        with TestClient(create_app(env.settings()), headers=auth()) as c:
            before = _samples(c.get("/metrics").text)
            assert _get(before, "congeal_store_up") == 1 and _get(before, "congeal_workers") == 1
            assert _get(before, "congeal_job_attempts_total", kind="align", outcome="succeeded") is None
            r = c.post("/jobs", files=files_for(SAMPLES[:8]), data={"budget": "1"}, headers={"X-Request-ID": rid})
            assert r.status_code == 202 and r.headers["x-request-id"] == rid
            jid = r.json()["id"]
            assert wait_job(c, jid, timeout=180)["status"] == "succeeded"
            text = c.get("/metrics").text
        m = _samples(text)
        rec = env.store().get(jid)
        (a,) = rec.attempts
        assert rec.request_id == rid
        # One attempt, succeeded; its device time is its wall time on the one CPU it held, exactly.
        assert _get(m, "congeal_job_attempts_total", kind="align", outcome="succeeded") == 1
        got = _get(m, "congeal_device_seconds_total", kind="align", device="cpu")
        assert got == pytest.approx(a.ended_at - a.started_at, rel=1e-9) and got > 0
        # Nothing waits now; the queue this env's worker consumes is empty.
        assert _get(m, "congeal_jobs", state="queued") == 0 and _get(m, "congeal_jobs", state="running") == 0
        assert _get(m, "congeal_queue_depth", queue=env.vars["CONGEAL_QUEUE"]) == 0
        # Request latency, by route template (one series for every job id).
        assert _get(m, "congeal_http_request_duration_seconds_count", method="POST", route="/jobs", status="202") == 1
        polls = _get(m, "congeal_http_request_duration_seconds_count", method="GET", route="/jobs/{job_id}",
                     status="200")
        assert polls >= 1
        assert _get(m, "congeal_http_request_duration_seconds_bucket", method="POST", route="/jobs", status="202",
                    le="+Inf") == 1
        assert not any("route" in dict(k[1]) and jid in dict(k[1])["route"] for k in m)

        # The worker logged the job at INFO, in logfmt, with the job's id and the creating request's id.
        deadline = time.monotonic() + 10
        while True:
            lines = [_logfmt(ln) for ln in worker.log_path.read_text().splitlines() if f"job_id={jid}" in ln]
            done = [f for f in lines if f.get("msg") == f"job {jid}: succeeded"]
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done and done[0]["level"] == "INFO" and done[0]["request_id"] == rid, lines
        assert any(f["msg"].startswith(f"job {jid}: attempt 1, child pid") for f in lines)
        assert all(f["request_id"] == rid for f in lines)

        # Task events: the API's 'sent' and the worker's received / started / succeeded, naming the job.
        deadline = time.monotonic() + 10
        while True:
            mine = [e for e in events.got if jid in str(e.get("args", ""))]
            uuids = {e["uuid"] for e in mine}
            kinds = {e["type"] for e in events.got if e.get("uuid") in uuids}
            if {"task-sent", "task-received", "task-started", "task-succeeded"} <= kinds:
                break
            assert time.monotonic() < deadline, kinds
            time.sleep(0.2)
    finally:
        events.close()


def test_congeal_serve_logs_requests_and_jobs_and_counts_the_queue(make_env, tmp_path):
    """The API as an operator runs it (congeal serve, Redis, no worker yet): a structured INFO line
    naming the job and the request it came from, and the jobs waiting show on /metrics."""
    env = make_env()
    port = free_port()
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "congeal", "serve", "--port", str(port)],
                                env={**os.environ, **env.vars}, stdout=logf, stderr=logf)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with httpx.Client(base_url=base, headers=auth(), timeout=60) as c:
            jids = []
            for i in range(2):
                r = c.post("/jobs", files=files_for(SAMPLES[:2]), data={"method": "lsc", "budget": "1"},
                           headers={"X-Request-ID": f"queue-test-{i}"})
                assert r.status_code == 202, r.text
                jids.append(r.json()["id"])
            bad = c.get("/jobs", headers={"X-Request-ID": "not a token!"})  # replaced, not echoed
            assert bad.headers["x-request-id"] != "not a token!" and len(bad.headers["x-request-id"]) == 32
            m = _samples(c.get("/metrics").text)
            assert _get(m, "congeal_jobs", state="queued") == 2 and _get(m, "congeal_workers") == 0
            assert _get(m, "congeal_queue_depth", queue=env.vars["CONGEAL_QUEUE"]) == 2
            for jid in jids:
                assert c.delete(f"/jobs/{jid}").status_code == 202
            m = _samples(c.get("/metrics").text)
            assert _get(m, "congeal_jobs", state="queued") == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("ts=")]
    fields = [_logfmt(ln) for ln in lines]
    created = [f for f in fields if f.get("msg") == f"job {jids[0]} created: align, 2 image(s)"]
    assert created and created[0]["level"] == "INFO" and created[0]["request_id"] == "queue-test-0"
    assert created[0]["job_id"] == jids[0] and created[0]["tenant"] == "alice"
    post = [f for f in fields if f.get("msg") == "POST /jobs 202" and f.get("request_id") == "queue-test-1"]
    assert post and post[0]["job_id"] == jids[1] and post[0]["route"] == "/jobs" and float(post[0]["duration_ms"]) > 0
    assert not [ln for ln in lines if "uvicorn.access" in ln]  # our request lines replace uvicorn's


def test_the_json_log_format_is_one_object_a_line_with_the_context():
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(StructuredFormatter("json"))
    lg = logging.getLogger("congeal.test-json")
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        with log_context(job_id="j1", request_id="r1"):
            lg.info('a "quoted"\nmessage', extra={"attempt": 2})
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("failed")
    finally:
        lg.removeHandler(h)
    first, second = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert first["msg"] == 'a "quoted"\nmessage' and first["level"] == "INFO" and first["logger"] == "congeal.test-json"
    assert first["job_id"] == "j1" and first["request_id"] == "r1" and first["attempt"] == 2
    assert "job_id" not in second and "ValueError: boom" in second["exc"]
