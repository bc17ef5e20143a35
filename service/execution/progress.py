"""Relaying a job's progress from its training child into the job record, rate-limited.

The child writes one JSON line per report on a pipe, as often as it likes (a fast trainer
reports every batch: thousands a second). Two threads: one reads the pipe and keeps only the
latest report (plus the attempt fields seen: first and last epoch, resume point); the other
writes that to the store at most every ``every_s`` (stage changes and messages sooner, but
still at most every ``urgent_every_s``) and once more, promptly, after the last report, so the
record is never more than ``every_s`` behind the child. The reader never waits on the store:
a slow or unreachable Redis cannot fill the pipe and stall the training. An hour-long job
costs the store at most ``3600 / every_s`` progress writes, whatever its step rate.

The relay is generic: ``step``/``total`` may count epochs, batches or images seen; ``eta_s``
is the child's own estimate, as of ``updated_at`` (the time of the child's report).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from ..contracts.records import ProgressRecord
from ..contracts.store import JobStore

__all__ = ["ProgressRelay", "RESUME_PREFIX", "PROGRESS_EVERY_S", "URGENT_EVERY_S"]

log = logging.getLogger("congeal.runner")

# How models.dprc announces a resume in its progress message.
RESUME_PREFIX = "resumed from checkpoint at step"
PROGRESS_EVERY_S = 0.5
URGENT_EVERY_S = 0.1


class ProgressRelay:
    """Reads the child's event pipe and writes progress into the job record."""

    def __init__(self, fd: int, store: JobStore, job_id: str, worker: str,
                 every_s: float = PROGRESS_EVERY_S, urgent_every_s: float = URGENT_EVERY_S):
        self.fd, self.store, self.job_id, self.worker = fd, store, job_id, worker
        self.every_s, self.urgent_every_s = every_s, urgent_every_s
        self.summary: dict | None = None
        self.error: dict | None = None
        self.last: ProgressRecord | None = None
        self.last_work: ProgressRecord | None = None  # last training report (it counts steps)
        self.first_epoch: int | None = None
        self.writes = 0  # progress writes to the store (what the rate limit bounds)
        self.events = 0
        self._cv = threading.Condition()
        self._attempt: dict = {}  # fields of the current attempt not yet written
        self._pending = False
        self._urgent = False
        self._stage: str | None = None  # stage of the last report seen
        self._written_at = float("-inf")
        self._done = False
        self._reader = threading.Thread(target=self._read, name=f"relay-{job_id[:8]}", daemon=True)
        self._writer = threading.Thread(target=self._write, name=f"relay-w-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    # ------------------------------------------------------------------ reading

    def _read(self) -> None:
        try:
            with os.fdopen(self.fd, "rb") as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    try:
                        self._on(ev)
                    except Exception:
                        log.exception("job %s: unreadable progress event", self.job_id)
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def _on(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "result":
            self.summary = ev.get("summary") or {}
            return
        if kind == "error":
            self.error = ev
            return
        if kind != "progress":
            return
        fields = {k: ev.get(k) for k in ProgressRecord.model_fields if k != "updated_at" and ev.get(k) is not None}
        p = ProgressRecord(**fields)
        with self._cv:
            self.events += 1
            urgent = p.stage != self._stage or p.message is not None
            if p.stage == "training" and p.epoch:
                if self.first_epoch is None:
                    self.first_epoch = self._attempt["first_epoch"] = p.epoch
                    urgent = True
                self._attempt["last_epoch"] = p.epoch
            if p.message and p.message.startswith(RESUME_PREFIX):
                self._attempt["resumed_from_epoch"] = p.epoch
            self._stage = p.stage
            self.last = p
            if p.total and p.stage == "training":
                self.last_work = p
            self._pending = True
            self._urgent = self._urgent or urgent
            self._cv.notify_all()

    # ------------------------------------------------------------------ writing

    def _due_in(self, t: float) -> float:
        wait = self.urgent_every_s if self._urgent else self.every_s
        return self._written_at + wait - t

    def _write(self) -> None:
        while True:
            with self._cv:
                while True:
                    t = time.monotonic()
                    if self._pending and (self._done or self._due_in(t) <= 0):
                        break
                    if self._done and not self._pending:
                        return
                    self._cv.wait(timeout=max(0.01, self._due_in(t)) if self._pending else None)
                progress, attempt = self.last, self._attempt
                self._attempt, self._pending, self._urgent = {}, False, False
                self._written_at = time.monotonic()
            try:
                self.store.report(self.job_id, self.worker, progress, **attempt)
                self.writes += 1
            except Exception:
                log.exception("job %s: could not record progress; retrying", self.job_id)
                with self._cv:
                    # Keep what was not written; newer fields of the same name win.
                    self._attempt = {**attempt, **self._attempt}
                    self._pending = True
                    if self._done:
                        return  # the attempt is over: its outcome is recorded by the supervisor
                time.sleep(self.every_s)

    def join(self, timeout: float = 10) -> None:
        """After the child exited: read what is left, write the last progress, stop."""
        self._reader.join(timeout=timeout)
        with self._cv:
            self._done = True
            self._cv.notify_all()
        self._writer.join(timeout=timeout)
