"""Progress on long jobs: the relay between the training child and the job record.

A job that reports every batch for an hour must cost the store a bounded number of writes,
keep the record within a fraction of a second of the child, and never be slowed by the
store. The relay (``service.execution.progress.ProgressRelay``) reads the child's real event
pipe here; the events are written by the test at a trainer's rate, in the child's protocol
(``worker/run_job.py``), counting images seen. The store is a real Redis of the test's own
(``redis-server`` on a free port), so its write count is exact (``INFO commandstats``) and it
can be frozen (``SIGSTOP``) to play a store that stops answering.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis

from service.contracts import JobKind, JobRecord, RedisJobStore, new_job_id
from service.execution.progress import PROGRESS_EVERY_S, ProgressRelay

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    yield proc, r, f"redis://127.0.0.1:{port}/0"
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=10)


def _sets(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_set", {}).get("calls", 0))


def _running_job(store: RedisJobStore, worker: str) -> str:
    rec = JobRecord(id=new_job_id(), kind=JobKind.align, owner="alice")
    store.insert(rec)
    assert store.claim(rec.id, worker, lease_ttl_s=600, max_attempts=3).run
    return rec.id


class Trainer:
    """Writes progress lines on the pipe like a trainer counting images seen: ``rate`` reports
    a second of ``batch`` images each, for ``seconds``; records when each write returned."""

    def __init__(self, fd: int, seconds: float, rate: float, batch: int = 4096):
        self.fd, self.seconds, self.rate, self.batch = fd, seconds, rate, batch
        self.total = int(seconds * rate) * batch
        self.sent: list[tuple[float, int, float]] = []  # (time, step, eta_s)
        self.longest_write_s = 0.0

    def _send(self, obj: dict) -> None:
        t = time.monotonic()
        os.write(self.fd, (json.dumps(obj) + "\n").encode())
        self.longest_write_s = max(self.longest_write_s, time.monotonic() - t)

    def run(self) -> None:
        self._send({"type": "progress", "stage": "loading", "message": "reading images"})
        t0 = time.monotonic()
        step, i = 0, 0
        while step < self.total:
            i += 1
            target = t0 + i / self.rate
            while time.monotonic() < target:
                time.sleep(min(0.002, max(0.0, target - time.monotonic())))
            step = min(self.total, step + self.batch)
            elapsed = time.monotonic() - t0
            eta = elapsed / step * (self.total - step)
            self._send({"type": "progress", "stage": "training", "step": step, "total": self.total, "epoch": 1,
                        "loss": 1.0 / i, "apsnr": None, "eta_s": eta, "message": None})
            self.sent.append((time.monotonic(), step, eta))
        os.close(self.fd)


def test_a_trainer_reporting_every_batch_costs_two_writes_a_second_and_its_last_report_lands(own_redis):
    _, r, url = own_redis
    store = RedisJobStore(url, "progress-test")
    jid = _running_job(store, "w1")
    rd, wr = os.pipe()
    relay = ProgressRelay(rd, store, jid, "w1")
    relay.start()
    sets0 = _sets(r)
    trainer = Trainer(wr, seconds=6.0, rate=1000)  # 6,000 reports, 24.6 M images
    t = threading.Thread(target=trainer.run)
    t.start()
    polls = []  # (poll time, record's step, record's updated_at, eta_s)
    while t.is_alive():
        p = store.get(jid).progress
        polls.append((time.time(), p.step, p.updated_at, p.eta_s))
        time.sleep(0.05)
    t.join()
    relay.join()
    writes = _sets(r) - sets0
    duration = trainer.sent[-1][0] - trainer.sent[0][0]
    final = store.get(jid).progress
    print(f"\n{relay.events} reports in {duration:.1f} s -> {writes} record writes "
          f"(the relay counted {relay.writes}); longest pipe write {trainer.longest_write_s * 1000:.1f} ms")
    assert relay.events == len(trainer.sent) + 1
    # Bounded: one write per PROGRESS_EVERY_S, plus the stage changes and the trailing write.
    assert writes == relay.writes
    assert writes <= duration / PROGRESS_EVERY_S + 4, writes
    assert writes >= duration / PROGRESS_EVERY_S * 0.6, writes  # and not starved: the record keeps up
    # The last report lands, with the child's own ETA for it.
    assert final.stage == "training" and final.step == final.total == trainer.total
    assert final.eta_s == pytest.approx(trainer.sent[-1][2], abs=1e-9)
    # The record is never more than about one interval behind the child.
    training = [p for p in polls if p[1] > 0]
    assert training
    worst = max(now - updated for now, _step, updated, _eta in training[3:])
    assert worst < 2 * PROGRESS_EVERY_S + 0.3, worst
    # ETA as recorded is the child's estimate at that step: elapsed + eta is the job's length.
    sent_eta = {step: eta for _, step, eta in trainer.sent}
    for _, step, _, eta in training:
        assert eta == pytest.approx(sent_eta[step], abs=1e-9)


def test_a_store_that_stops_answering_never_stalls_the_trainer(own_redis):
    proc, r, url = own_redis
    store = RedisJobStore(url, "progress-test")
    jid = _running_job(store, "w1")
    rd, wr = os.pipe()
    relay = ProgressRelay(rd, store, jid, "w1")
    relay.start()
    trainer = Trainer(wr, seconds=5.0, rate=2000, batch=256)  # 10,000 reports of ~190 bytes: 30 pipes' worth
    t = threading.Thread(target=trainer.run)
    t.start()
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGSTOP)  # Redis freezes: every store call now hangs
    time.sleep(3.0)
    os.kill(proc.pid, signal.SIGCONT)
    t.join()
    relay.join(timeout=15)
    print(f"\nlongest pipe write while Redis was frozen for 3 s: {trainer.longest_write_s * 1000:.1f} ms")
    assert trainer.longest_write_s < 0.5, trainer.longest_write_s  # the pipe never filled up
    final = store.get(jid).progress
    assert final.step == final.total == trainer.total  # and after Redis came back the last report landed
