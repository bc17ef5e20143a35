"""Embedded mode: the API runs jobs itself, with no Redis and no Celery.

Jobs go on an in-process queue; threads take them and call the same
:class:`~service.execution.runner.JobRunner` a Celery worker calls, so each
job still trains in its own child process (the API process stays torch-free)
with the same cancel, time limit, checkpoint and resume behaviour. The job
store is SQLite in the data dir, so jobs survive a restart: queued jobs are
queued again at startup, and a job that was running resumes from its
checkpoint once its old lease expires.
"""
from __future__ import annotations

import logging
import queue
import threading

from .contracts import ArtifactStore, JobRecord, JobStatus, Settings
from .contracts.store import JobStore
from .execution import JobRunner, Maintenance, worker_name

__all__ = ["EmbeddedRunner"]

log = logging.getLogger("congeal.embedded")


class EmbeddedRunner:
    """A :class:`~service.contracts.tasks.Dispatcher` that runs jobs on local threads."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, settings: Settings):
        self.store, self.artifacts, self.settings = store, artifacts, settings
        self.name = worker_name("embedded")
        self._q: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"congeal-job-{i}", daemon=True)
                         for i in range(settings.embedded_workers)]
        self._maintenance = Maintenance(store, self, settings, name=self.name, info={"kind": "embedded"},
                                        artifacts=artifacts)

    def start(self) -> "EmbeddedRunner":
        for t in self._threads:
            t.start()
        # The in-memory queue died with the previous process: queue its queued jobs again.
        for jid in self.store.active_ids():
            rec = self.store.get(jid)
            if rec is not None and rec.status == JobStatus.queued:
                self._q.put(jid)
        self._maintenance.start()
        return self

    def dispatch(self, rec: JobRecord) -> None:
        if self._stop.is_set():
            raise RuntimeError("the embedded runner is shutting down")
        self._q.put(rec.id)

    def pending(self) -> int:
        """Jobs waiting for a thread."""
        return self._q.qsize()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _loop(self, i: int) -> None:
        # A name per thread: two threads must never look like one lease holder.
        runner = JobRunner(self.store, self.artifacts, self.settings, name=f"{self.name}/t{i}")
        try:
            while not self._stop.is_set():
                try:
                    jid = self._q.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    runner.run(jid, stop=self._stop)  # logs the outcome, with the job's id
                except Exception:
                    log.exception("job %s: the runner failed; the reconciler will retry it", jid)
        finally:
            runner.close()

    def close(self) -> None:
        """Stop taking jobs; running ones are stopped and resume at the next start."""
        self._stop.set()
        self._maintenance.stop()
        for t in self._threads:
            t.join(timeout=30)
