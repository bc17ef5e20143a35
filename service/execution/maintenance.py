"""Keeping jobs moving when workers die, and deleting what has expired.

:func:`reconcile` requeues jobs whose worker's lease lapsed (and re-sends lost task messages),
:func:`sweep_expired` and the dataset sweep apply the retention settings, and
:class:`Maintenance` runs both, plus the heartbeat ``/readyz`` reads, on a background thread of
every Celery worker and of the embedded runner: one holder of the store's ``maintenance`` lease
at a time does the work. Torch-free, FastAPI-free.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from ..contracts import open_dataset_store
from ..contracts.artifacts import ArtifactStore, valid_job_id
from ..contracts.datasets import sweep_datasets
from ..contracts.records import JobStatus, now
from ..contracts.settings import Settings
from ..contracts.store import JobStore, _resend_due
from ..contracts.tasks import Dispatcher

__all__ = ["Maintenance", "reconcile", "purge", "sweep_expired", "ORPHAN_FOLDER_GRACE_S"]

log = logging.getLogger("congeal.runner")


def reconcile(store: JobStore, dispatcher: Dispatcher, resend_after_s: float | None = None) -> list[str]:
    """Requeue jobs nobody is working on (see :meth:`JobStore.requeue_if_orphaned`), and,
    with ``resend_after_s``, send again the task of a queued job that has not started that
    long after it was sent (a broker message lost, e.g. to a Redis crash).

    Safe to run from several workers at once: the record update is atomic, so
    each orphan is requeued once, and a duplicate delivery would be refused by
    :meth:`JobStore.claim` anyway.
    """
    requeued = []
    t = now()
    for jid in store.active_ids():
        seen = store.get(jid)
        # Cheap read first; the atomic update only for jobs that look orphaned.
        if seen is None or not (
                (seen.status == JobStatus.running and (seen.lease_expires_at or 0) <= t)
                or (seen.status == JobStatus.queued and seen.enqueued_at is None)
                or _resend_due(seen, t, resend_after_s)):
            continue
        rec = store.requeue_if_orphaned(jid, resend_after_s=resend_after_s)
        if rec is None:
            continue
        try:
            dispatcher.dispatch(rec)
            requeued.append(jid)
            if rec.resent > seen.resent:
                why = f"queued since its task was sent, never started; sent again (re-send {rec.resent})"
            else:
                why = rec.progress.message if rec.progress else "never sent"
            log.warning("job %s: requeued (%s)", jid, why)
        except Exception:
            log.exception("job %s: could not requeue; will try again", jid)
            store.mark_enqueued(jid, sent=False)
    return requeued


def purge(store: JobStore, artifacts: ArtifactStore, job_id: str) -> None:
    """Delete a finished job: its files first, then the record, so a failure half-way leaves
    a record that a later sweep (or DELETE) finds again, never files nobody can find."""
    artifacts.remove_job(job_id)
    store.delete(job_id)


def sweep_expired(store: JobStore, artifacts: ArtifactStore, ttl_s: float) -> list[str]:
    """Purge jobs that ended more than ``ttl_s`` ago. Any number of workers may sweep at
    once: purging twice is harmless."""
    gone = []
    for jid in store.expired_ids(now() - ttl_s):
        rec = store.get(jid)
        if rec is not None and not rec.terminal:  # the index is ahead of a requeued record
            continue
        purge(store, artifacts, jid)
        gone.append(jid)
    if gone:
        log.info("retention: purged %d job(s) finished more than %.0f s ago", len(gone), ttl_s)
    gone += _sweep_orphan_folders(store, artifacts, max(ttl_s, ORPHAN_FOLDER_GRACE_S))
    return gone


# An upload's folder exists before its record (the record is written once the upload is
# checked). A folder with no record is an upload cut short by a killed API process; one this
# old cannot be an upload still streaming in.
ORPHAN_FOLDER_GRACE_S = 24 * 3600


def _sweep_orphan_folders(store: JobStore, artifacts: ArtifactStore, older_than_s: float) -> list[str]:
    jobs = artifacts.root / "jobs"
    if not jobs.is_dir():
        return []
    cutoff = now() - older_than_s
    gone = []
    for d in jobs.iterdir():
        try:
            newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
        except OSError:
            continue
        # store.get raises if the store is down: then nothing is taken for an orphan.
        if newest < cutoff and valid_job_id(d.name) and store.get(d.name) is None:
            artifacts.remove_job(d.name)
            gone.append(d.name)
            log.warning("retention: removed %s, an upload folder with no job record", d)
    return gone


class Maintenance:
    """A worker's background thread: heartbeat for ``/readyz``, the reconciler, and the
    retention sweep (every ``sweep_interval_s``, when ``job_ttl_s`` is set).

    Every worker beats; one at a time (the holder of the store's ``maintenance`` lease, three
    intervals long and renewed on each pass) reconciles and sweeps, so the store is scanned once
    per interval however many workers there are. A leader that dies is replaced within three
    intervals, one that stops gives the lease up at once. Both duties stay safe to run twice (a
    lease can lapse mid-pass).
    """

    def __init__(self, store: JobStore, dispatcher: Dispatcher, settings: Settings, name: str,
                 info: dict | None = None, artifacts: ArtifactStore | None = None):
        self.store, self.dispatcher, self.settings, self.name = store, dispatcher, settings, name
        self.artifacts = artifacts or ArtifactStore(settings.data_dir)
        self._last_sweep = float("-inf")
        self._last_dataset_sweep = float("-inf")
        self._datasets = None  # opened on the first dataset sweep
        self.info = info or {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="congeal-maintenance", daemon=True)

    def start(self) -> "Maintenance":
        try:
            self._beat()  # at once, so /readyz is right as soon as the worker is up
        except Exception:
            log.exception("first heartbeat failed; retrying")
        self.thread.start()
        return self

    def _beat(self) -> None:
        every = self.settings.reconcile_interval_s
        self.store.heartbeat(self.name, ttl_s=max(3 * every, 10.0), info={**self.info, "pid": os.getpid()})

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        try:  # an orderly shutdown hands the duty on at once instead of after the lease lapses
            self.store.resign("maintenance", self.name)
        except Exception:
            log.exception("could not give up the maintenance lease; it lapses on its own")

    def _loop(self) -> None:
        every = self.settings.reconcile_interval_s
        while True:
            try:
                self._beat()
                if self.store.lead("maintenance", self.name, ttl_s=3 * every):
                    reconcile(self.store, self.dispatcher, self.settings.requeue_queued_after_s)
                    ttl = self.settings.job_ttl_s
                    if ttl is not None and time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
                        self._last_sweep = time.monotonic()
                        sweep_expired(self.store, self.artifacts, ttl)
                    if time.monotonic() - self._last_dataset_sweep >= self.settings.sweep_interval_s:
                        self._last_dataset_sweep = time.monotonic()
                        self._sweep_datasets()
            except Exception:
                log.exception("maintenance pass failed; retrying")
            if self._stop.wait(every):
                return

    def _sweep_datasets(self) -> None:
        # Unused datasets expire (dataset_ttl_s, else job_ttl_s); interrupted deletes are finished.
        if self._datasets is None:
            self._datasets = open_dataset_store(self.settings)
        gone = sweep_datasets(self._datasets, self.store, self.artifacts, self.settings.dataset_ttl)
        if gone:
            log.info("retention: deleted %d dataset(s)", len(gone))
