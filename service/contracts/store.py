"""The job store's interface: where job records live, and the job's life cycle on top of it.

Backends implement one primitive, :meth:`JobStore.update` (an atomic read-modify-write of one
record), plus a few indexes, and the job's life cycle is written once on top of it in
:class:`JobStore`: create (with idempotency keys), claim (with a lease and an attempt counter),
progress, finish, cancel and requeueing jobs whose worker died. The backends, a file each:
:mod:`.redis_store` (production) and :mod:`.sqlite_store` (embedded);
:func:`service.contracts.open_store` picks one from the settings. Torch-free and FastAPI-free:
the API and the workers both use them.
"""
from __future__ import annotations

import collections
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from .records import Attempt, JobRecord, JobStatus, ProgressRecord, now

__all__ = ["JobStore", "Claim", "InFlightLimit", "Mutator"]


class InFlightLimit(Exception):
    """``insert`` refused: the owner already has ``count`` jobs queued or running."""

    def __init__(self, count: int):
        super().__init__(f"{count} jobs in flight")
        self.count = count


_HITS_LOCK = threading.Lock()
Mutator = Callable[[JobRecord], "JobRecord | None"]


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker asking to run a job."""

    run: bool
    reason: str
    record: JobRecord | None


class JobStore(ABC):
    # ------------------------------------------------------------------ primitives

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot be reached."""

    @abstractmethod
    def insert(self, rec: JobRecord, max_in_flight: int | None = None) -> tuple[JobRecord, bool]:
        """Store a new record. With ``rec.idempotency_key`` set and a job already
        holding that key for that owner, store nothing and return ``(that job, False)``.

        With ``max_in_flight``, raise :class:`InFlightLimit` instead of storing when
        the owner already has that many jobs not yet terminal; the count and the
        insert are one atomic step, so racing uploads cannot both pass the limit.
        """

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def update(self, job_id: str, fn: Mutator) -> tuple[JobRecord | None, bool]:
        """Atomically apply ``fn`` to a copy of the record and store what it returns.

        ``fn`` returns ``None`` to leave the record as it is. Returns the record
        as stored afterwards (``None`` if there is no such job) and whether it changed.
        """

    @abstractmethod
    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        """The owner's jobs, newest first, and how many there are in all."""

    @abstractmethod
    def find_idempotent(self, owner: str, key: str) -> JobRecord | None: ...

    @abstractmethod
    def active_ids(self) -> list[str]:
        """Ids of jobs not yet in a terminal state (what the reconciler scans)."""

    @abstractmethod
    def heartbeat(self, worker: str, ttl_s: float, info: dict) -> None:
        """Announce that ``worker`` is alive for the next ``ttl_s`` seconds."""

    @abstractmethod
    def live_workers(self) -> list[dict]: ...

    @abstractmethod
    def lead(self, role: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a ``ttl_s`` lease on ``role`` for ``holder``; False while another
        holder's lease runs. Lets one of many workers do a periodic duty; the duties it guards
        must stay safe to run twice, since a lease can lapse mid-duty."""

    @abstractmethod
    def resign(self, role: str, holder: str) -> None:
        """Give up ``holder``'s lease on ``role`` now (nothing if another holds it)."""

    @abstractmethod
    def count_in_flight(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Forget a job entirely (its files are the artifact store's business)."""

    @abstractmethod
    def expired_ids(self, finished_before: float, limit: int = 500) -> list[str]:
        """Terminal jobs that ended before ``finished_before``, oldest first."""

    def hit(self, bucket: str, limit: int, window_s: float) -> tuple[bool, float]:
        """Admit one request against ``bucket`` if fewer than ``limit`` were admitted in
        the last ``window_s`` seconds (a sliding window: no burst across a boundary).

        Returns whether it was admitted and, if not, the seconds until one more would be.
        This in-process version serves embedded mode (one process); Redis overrides it.
        """
        t = now()
        with _HITS_LOCK:
            logs = self.__dict__.setdefault("_hits", {})
            log = logs.setdefault(bucket, collections.deque())
            while log and log[0] <= t - window_s:
                log.popleft()
            for b in [b for b, q in logs.items() if not q and b != bucket]:
                del logs[b]
            if len(log) < limit:
                log.append(t)
                return True, 0.0
            return False, log[0] + window_s - t

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    # ------------------------------------------------------------------ life cycle

    def claim(self, job_id: str, worker: str, lease_ttl_s: float, max_attempts: int) -> Claim:
        """Called by a worker that received the job's task. Decides whether it runs it.

        A task can arrive twice (broker redelivery after the visibility timeout,
        or the reconciler requeueing a job whose lease expired). The record
        decides: only a queued job, or a running one whose lease has expired,
        is taken, and every take counts as an attempt.
        """
        verdict: dict = {}

        def fn(rec: JobRecord) -> JobRecord | None:
            t = now()
            if rec.terminal:
                verdict.update(run=False, reason=f"already {rec.status.value}")
                return None
            # A live lease means some worker (even one of the same name) is on it:
            # this delivery is a duplicate and must not start a second training run.
            if rec.status == JobStatus.running and (rec.lease_expires_at or 0) > t:
                verdict.update(run=False, reason=f"running on {rec.lease_owner}")
                return None
            if rec.cancel_requested:
                verdict.update(run=False, reason="cancelled before it started")
                return _terminal(rec, JobStatus.cancelled, t, outcome="cancelled")
            rec = rec.model_copy(deep=True)
            if rec.attempts and rec.attempts[-1].ended_at is None:
                rec.attempts[-1].ended_at, rec.attempts[-1].outcome = t, "lost"
            n = len(rec.attempts) + 1
            # Only crashes count: a job interrupted by orderly shutdowns may resume any number of times.
            crashes = sum(a.outcome == "lost" for a in rec.attempts)
            if crashes >= max_attempts:
                verdict.update(run=False, reason="too many attempts")
                last = next((a.detail for a in reversed(rec.attempts) if a.outcome == "lost" and a.detail), None)
                rec.error = (f"the job's worker stopped without finishing {crashes} times "
                             f"(limit {max_attempts}); giving up" + (f" (last: {last})" if last else ""))
                rec.error_kind = "lost"
                return _terminal(rec, JobStatus.failed, t)
            rec.attempts.append(Attempt(n=n, worker=worker, started_at=t))
            rec.status = JobStatus.running
            rec.started_at = rec.started_at or t
            rec.lease_owner, rec.lease_expires_at = worker, t + lease_ttl_s
            rec.progress = ProgressRecord(stage="starting", message=f"attempt {n} on {worker}")
            rec.updated_at = t
            verdict.update(run=True, reason=f"attempt {n}")
            return rec

        rec, _ = self.update(job_id, fn)
        if rec is None:
            return Claim(False, "unknown job", None)
        return Claim(verdict.get("run", False), verdict.get("reason", "?"), rec)

    def renew_lease(self, job_id: str, worker: str, lease_ttl_s: float) -> JobRecord | None:
        """Extend ``worker``'s lease; ``None`` if it no longer holds it."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.lease_owner != worker or rec.terminal:
                return None
            rec = rec.model_copy()
            rec.lease_expires_at = now() + lease_ttl_s
            return rec

        rec, changed = self.update(job_id, fn)
        return rec if changed else None

    def report(self, job_id: str, worker: str, progress: ProgressRecord | None = None,
               **attempt_fields) -> bool:
        """Write progress (and fields of the current attempt) if ``worker`` still holds the job."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.lease_owner != worker or rec.terminal:
                return None
            rec = rec.model_copy(deep=True)
            if progress is not None:
                rec.progress = progress
            if attempt_fields and rec.attempts:
                for k, v in attempt_fields.items():
                    setattr(rec.attempts[-1], k, v)
            rec.updated_at = now()
            return rec

        return self.update(job_id, fn)[1]

    def finish(self, job_id: str, worker: str, status: JobStatus, *, error: str | None = None,
               error_kind: str | None = None, result: dict | None = None,
               progress: ProgressRecord | None = None) -> bool:
        """Record the end of ``worker``'s attempt. Ignored if the worker lost the job meanwhile."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.lease_owner != worker or rec.terminal:
                return None
            rec = rec.model_copy(deep=True)
            rec.error, rec.error_kind, rec.result = error, error_kind, result
            if progress is not None:
                rec.progress = progress
            return _terminal(rec, status, now(), outcome=status.value)

        return self.update(job_id, fn)[1]

    def request_cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """A queued job is cancelled at once; a running one is flagged for its worker to stop.

        Returns the record and whether the request changed anything (``False``
        for a job that had already finished).
        """

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.terminal or rec.cancel_requested:
                return None
            rec = rec.model_copy(deep=True)
            rec.cancel_requested = True
            if rec.status == JobStatus.queued:
                return _terminal(rec, JobStatus.cancelled, now(), outcome="cancelled")
            rec.updated_at = now()
            return rec

        return self.update(job_id, fn)

    def requeue_if_orphaned(self, job_id: str, grace_s: float = 30.0,
                            resend_after_s: float | None = None) -> JobRecord | None:
        """Put a job back in the queue if nobody is working on it; return it if so.

        Orphans are running jobs whose lease expired (the worker died),
        queued jobs that were never handed to the broker (the API died between
        writing the record and sending the task), and, with ``resend_after_s``,
        queued jobs whose task was sent that long ago (times 2 per earlier
        re-send) without the job starting: the broker may have lost the message.
        Sending a task twice is safe: :meth:`claim` runs a job once at a time.
        """

        def fn(rec: JobRecord) -> JobRecord | None:
            t = now()
            if _resend_due(rec, t, resend_after_s):
                rec = rec.model_copy(deep=True)
                rec.resent += 1
                rec.enqueued_at = rec.updated_at = t
                return rec
            if rec.status == JobStatus.running and (rec.lease_expires_at or 0) <= t:
                rec = rec.model_copy(deep=True)
                if rec.attempts and rec.attempts[-1].ended_at is None:
                    rec.attempts[-1].ended_at, rec.attempts[-1].outcome = t, "lost"
                    rec.attempts[-1].pid = None
                rec.status = JobStatus.queued
                rec.lease_owner = rec.lease_expires_at = None
                rec.progress = ProgressRecord(stage="queued", message="worker lost; requeued to resume "
                                                                      "from its last checkpoint")
            elif rec.status == JobStatus.queued and rec.enqueued_at is None and t - rec.created_at > grace_s:
                rec = rec.model_copy(deep=True)
            else:
                return None
            rec.enqueued_at = rec.updated_at = t
            return rec

        rec, changed = self.update(job_id, fn)
        return rec if changed else None

    def mark_enqueued(self, job_id: str, sent: bool = True) -> None:
        """Note that the job's task was handed to the broker, or (``sent=False``) that
        sending failed, so that the reconciler sends it again later."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.terminal:
                return None
            rec = rec.model_copy()
            rec.enqueued_at = now() if sent else None
            return rec

        self.update(job_id, fn)

    def abandon(self, job_id: str, worker: str, detail: str) -> bool:
        """End ``worker``'s attempt as lost without finishing the job (its training process
        was killed by a signal nobody here sent): the lease expires now, so the reconciler
        requeues the job and the next attempt resumes from its checkpoint; like a dead
        worker, this counts against ``max_attempts``. False if the worker no longer held it."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.lease_owner != worker or rec.terminal:
                return None
            rec = rec.model_copy(deep=True)
            t = now()
            rec.lease_expires_at = t
            if rec.attempts and rec.attempts[-1].ended_at is None:
                a = rec.attempts[-1]
                a.ended_at, a.outcome, a.pid, a.detail = t, "lost", None, detail
            rec.progress = ProgressRecord(stage="queued", message=f"{detail}; will resume from its last checkpoint")
            rec.updated_at = t
            return rec

        return self.update(job_id, fn)[1]

    def release(self, job_id: str, worker: str) -> None:
        """Give up a running job without finishing it (shutdown): its lease expires now,
        so the reconciler requeues it and the next attempt resumes from its checkpoint."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.lease_owner != worker or rec.terminal:
                return None
            rec = rec.model_copy(deep=True)
            rec.lease_expires_at = now()
            if rec.attempts and rec.attempts[-1].ended_at is None:
                rec.attempts[-1].ended_at, rec.attempts[-1].outcome = now(), "interrupted"
                rec.attempts[-1].pid = None
            rec.progress = ProgressRecord(stage="queued", message="interrupted by a shutdown; will resume "
                                                                  "from its last checkpoint")
            return rec

        self.update(job_id, fn)

    def fail(self, job_id: str, error: str, kind: str = "internal") -> None:
        """Fail a job that no worker holds."""

        def fn(rec: JobRecord) -> JobRecord | None:
            if rec.terminal:
                return None
            rec = rec.model_copy(deep=True)
            rec.error, rec.error_kind = error, kind
            return _terminal(rec, JobStatus.failed, now())

        self.update(job_id, fn)


def _resend_due(rec: JobRecord, t: float, after_s: float | None) -> bool:
    """A queued job sent long enough ago (the wait doubles per re-send, up to 64x) that its
    message may be lost."""
    if after_s is None or rec.status != JobStatus.queued or rec.enqueued_at is None:
        return False
    return t - rec.enqueued_at > after_s * 2 ** min(rec.resent, 6)


def _terminal(rec: JobRecord, status: JobStatus, t: float, outcome: str | None = None) -> JobRecord:
    rec = rec.model_copy(deep=True)
    rec.status = status
    rec.finished_at = rec.updated_at = t
    rec.lease_owner = rec.lease_expires_at = None
    if rec.attempts and rec.attempts[-1].ended_at is None:
        rec.attempts[-1].ended_at, rec.attempts[-1].outcome = t, outcome or status.value
        rec.attempts[-1].pid = None
    return rec
