"""Job stores: where job records live. Redis in production, SQLite embedded.

Both implement one primitive, :meth:`JobStore.update` (an atomic
read-modify-write of one record), and the job's life cycle is written once on
top of it in :class:`JobStore`: create (with idempotency keys), claim (with a
lease and an attempt counter), progress, finish, cancel and requeueing jobs
whose worker died. The stores are torch-free and FastAPI-free: the API and
the worker both use them.
"""
from __future__ import annotations

import collections
import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .records import Attempt, JobRecord, JobStatus, ProgressRecord, now

__all__ = ["JobStore", "RedisJobStore", "SqliteJobStore", "Claim", "InFlightLimit", "open_store"]


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


# ---------------------------------------------------------------------- Redis


class RedisJobStore(JobStore):
    """Keys (``P`` = ``key_prefix``)::

        P:job:<id>                 the record, JSON
        P:owner:<owner>:jobs       sorted set of ids by creation time
        P:idem:<owner>:<key>       idempotency key -> id
        P:active                   set of ids not yet terminal
        P:owner:<owner>:active     the same, per owner (jobs-in-flight limit)
        P:finished                 sorted set of terminal ids by end time (retention sweep)
        P:rate:<bucket>            admitted request times of the last window (sorted set), expires
        P:worker:<name>            worker heartbeat, expires
        P:lead:<role>              the holder of a periodic duty's lease, expires
    """

    # Take the lease if free or ours (renewing it), in one step on the server.
    _LEAD_SCRIPT = """
    local cur = redis.call('GET', KEYS[1])
    if cur and cur ~= ARGV[1] then return 0 end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
    """
    _RESIGN_SCRIPT = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
    return 0
    """

    def __init__(self, url: str, key_prefix: str = "congeal"):
        import redis  # imported here so the embedded mode never needs the package at all

        self._redis_mod = redis
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=30)
        self.p = key_prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    def ping(self) -> None:
        self.r.ping()

    def insert(self, rec: JobRecord, max_in_flight: int | None = None) -> tuple[JobRecord, bool]:
        jk = self._k("job", rec.id)
        ik = self._k("idem", rec.owner, rec.idempotency_key) if rec.idempotency_key else None
        ak = self._k("owner", rec.owner, "active")
        with self.r.pipeline() as pipe:
            while True:
                try:
                    if ik:
                        pipe.watch(ik)
                        existing = pipe.get(ik)
                        if existing is not None:
                            pipe.unwatch()
                            other = self.get(existing.decode())
                            if other is not None:
                                return other, False
                    if max_in_flight is not None:
                        pipe.watch(ak)  # a racing insert changes the set: this transaction retries
                        count = pipe.scard(ak)
                        if count >= max_in_flight:
                            pipe.unwatch()
                            raise InFlightLimit(count)
                    pipe.multi()
                    pipe.set(jk, rec.model_dump_json())
                    pipe.zadd(self._k("owner", rec.owner, "jobs"), {rec.id: rec.created_at})
                    pipe.sadd(self._k("active"), rec.id)
                    pipe.sadd(ak, rec.id)
                    if ik:
                        pipe.set(ik, rec.id)
                    pipe.execute()
                    return rec, True
                except self._redis_mod.WatchError:
                    continue

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(self._k("job", job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    def update(self, job_id: str, fn: Mutator) -> tuple[JobRecord | None, bool]:
        jk = self._k("job", job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(jk)
                    raw = pipe.get(jk)
                    if raw is None:
                        pipe.unwatch()
                        return None, False
                    rec = JobRecord.model_validate_json(raw)
                    new = fn(rec)
                    if new is None:
                        pipe.unwatch()
                        return rec, False
                    pipe.multi()
                    pipe.set(jk, new.model_dump_json())
                    if new.terminal:
                        pipe.srem(self._k("active"), job_id)
                        pipe.srem(self._k("owner", new.owner, "active"), job_id)
                        pipe.zadd(self._k("finished"), {job_id: new.finished_at or now()})
                    else:
                        pipe.sadd(self._k("active"), job_id)
                        pipe.sadd(self._k("owner", new.owner, "active"), job_id)
                    pipe.execute()
                    return new, True
                except self._redis_mod.WatchError:
                    continue  # someone wrote the record meanwhile: re-read and re-apply

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        zk = self._k("owner", owner, "jobs")
        total = self.r.zcard(zk)
        # ZREVRANGE takes 64-bit indexes only: a page past the end is empty without asking.
        ids = ([i.decode() for i in self.r.zrevrange(zk, offset, min(offset + limit, total) - 1)]
               if 0 <= offset < total and limit > 0 else [])
        raws = self.r.mget([self._k("job", i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(x) for x in raws if x is not None], total

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        jid = self.r.get(self._k("idem", owner, key))
        return None if jid is None else self.get(jid.decode())

    def active_ids(self) -> list[str]:
        return sorted(i.decode() for i in self.r.smembers(self._k("active")))

    def count_in_flight(self, owner: str) -> int:
        return self.r.scard(self._k("owner", owner, "active"))

    def delete(self, job_id: str) -> None:
        rec = self.get(job_id)
        with self.r.pipeline() as pipe:
            pipe.delete(self._k("job", job_id))
            pipe.srem(self._k("active"), job_id)
            pipe.zrem(self._k("finished"), job_id)
            if rec is not None:
                pipe.zrem(self._k("owner", rec.owner, "jobs"), job_id)
                pipe.srem(self._k("owner", rec.owner, "active"), job_id)
                if rec.idempotency_key:
                    pipe.delete(self._k("idem", rec.owner, rec.idempotency_key))
            pipe.execute()

    def expired_ids(self, finished_before: float, limit: int = 500) -> list[str]:
        return [i.decode() for i in self.r.zrangebyscore(self._k("finished"), "-inf", finished_before,
                                                         start=0, num=limit)]

    # Sliding-window log: one sorted set of admitted request times per bucket, trimmed and
    # checked in one script, so every API process shares it atomically. Redis's own clock is
    # the only clock, so replicas with skewed clocks still agree.
    _HIT_SCRIPT = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    if redis.call('ZCARD', KEYS[1]) < limit then
        redis.call('ZADD', KEYS[1], now, ARGV[3])
        redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
        return {1, '0'}
    end
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(tonumber(oldest[2]) + window - now)}
    """

    def hit(self, bucket: str, limit: int, window_s: float) -> tuple[bool, float]:
        import uuid

        if not hasattr(self, "_hit"):
            self._hit = self.r.register_script(self._HIT_SCRIPT)
        ok, wait = self._hit(keys=[self._k("rate", bucket)], args=[window_s, limit, uuid.uuid4().hex])
        return bool(ok), float(wait)

    def heartbeat(self, worker: str, ttl_s: float, info: dict) -> None:
        self.r.set(self._k("worker", worker), json.dumps({**info, "name": worker, "seen_at": now()}),
                   px=max(1, int(ttl_s * 1000)))

    def lead(self, role: str, holder: str, ttl_s: float) -> bool:
        if not hasattr(self, "_lead"):
            self._lead = self.r.register_script(self._LEAD_SCRIPT)
        return bool(self._lead(keys=[self._k("lead", role)], args=[holder, max(1, int(ttl_s * 1000))]))

    def resign(self, role: str, holder: str) -> None:
        if not hasattr(self, "_resign"):
            self._resign = self.r.register_script(self._RESIGN_SCRIPT)
        self._resign(keys=[self._k("lead", role)], args=[holder])

    def live_workers(self) -> list[dict]:
        keys = list(self.r.scan_iter(match=self._k("worker", "*"), count=500))
        raws = self.r.mget(keys) if keys else []
        return [json.loads(x) for x in raws if x is not None]

    def close(self) -> None:
        self.r.close()


# ---------------------------------------------------------------------- SQLite


class SqliteJobStore(JobStore):
    """Embedded mode: one file in the data dir, so job records survive a restart.

    A single connection guarded by a lock serves every thread of the process;
    ``BEGIN IMMEDIATE`` makes each update atomic against other processes too.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                  isolation_level=None)
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,
                    terminal INTEGER NOT NULL, idem_key TEXT, data TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at DESC);
                CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem_key)
                    WHERE idem_key IS NOT NULL;
                CREATE TABLE IF NOT EXISTS workers (name TEXT PRIMARY KEY, expires_at REAL, info TEXT);
                CREATE TABLE IF NOT EXISTS leases (role TEXT PRIMARY KEY, holder TEXT, expires_at REAL);
                """
            )

    def ping(self) -> None:
        with self._lock:
            self.db.execute("SELECT 1").fetchone()

    def insert(self, rec: JobRecord, max_in_flight: int | None = None) -> tuple[JobRecord, bool]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if rec.idempotency_key:
                    row = self.db.execute("SELECT data FROM jobs WHERE owner=? AND idem_key=?",
                                          (rec.owner, rec.idempotency_key)).fetchone()
                    if row:
                        self.db.execute("COMMIT")
                        return JobRecord.model_validate_json(row[0]), False
                if max_in_flight is not None:
                    count = self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND terminal=0",
                                            (rec.owner,)).fetchone()[0]
                    if count >= max_in_flight:
                        self.db.execute("COMMIT")
                        raise InFlightLimit(count)
                self.db.execute(
                    "INSERT INTO jobs (id, owner, created_at, terminal, idem_key, data) VALUES (?,?,?,?,?,?)",
                    (rec.id, rec.owner, rec.created_at, int(rec.terminal), rec.idempotency_key,
                     rec.model_dump_json()))
                self.db.execute("COMMIT")
                return rec, True
            except InFlightLimit:  # refused after a clean COMMIT of nothing
                raise
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self.db.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else JobRecord.model_validate_json(row[0])

    def update(self, job_id: str, fn: Mutator) -> tuple[JobRecord | None, bool]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is None:
                    self.db.execute("COMMIT")
                    return None, False
                rec = JobRecord.model_validate_json(row[0])
                new = fn(rec)
                if new is None:
                    self.db.execute("COMMIT")
                    return rec, False
                self.db.execute("UPDATE jobs SET data=?, terminal=? WHERE id=?",
                                (new.model_dump_json(), int(new.terminal), job_id))
                self.db.execute("COMMIT")
                return new, True
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        with self._lock:
            total = self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner=?", (owner,)).fetchone()[0]
            if not (0 <= offset < total and limit > 0):  # SQLite integers are 64-bit: never bind a larger one
                return [], total
            rows = self.db.execute(
                "SELECT data FROM jobs WHERE owner=? ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                (owner, min(limit, total), offset)).fetchall()
        return [JobRecord.model_validate_json(r[0]) for r in rows], total

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        with self._lock:
            row = self.db.execute("SELECT data FROM jobs WHERE owner=? AND idem_key=?", (owner, key)).fetchone()
        return None if row is None else JobRecord.model_validate_json(row[0])

    def active_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE terminal=0 ORDER BY id")]

    def count_in_flight(self, owner: str) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND terminal=0", (owner,)).fetchone()[0]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def expired_ids(self, finished_before: float, limit: int = 500) -> list[str]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id FROM jobs WHERE terminal=1 AND json_extract(data, '$.finished_at') < ? "
                "ORDER BY json_extract(data, '$.finished_at') LIMIT ?", (finished_before, limit)).fetchall()
        return [r[0] for r in rows]

    def heartbeat(self, worker: str, ttl_s: float, info: dict) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO workers (name, expires_at, info) VALUES (?,?,?)",
                            (worker, now() + ttl_s, json.dumps({**info, "name": worker, "seen_at": now()})))

    def lead(self, role: str, holder: str, ttl_s: float) -> bool:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                t = now()
                row = self.db.execute("SELECT holder, expires_at FROM leases WHERE role=?", (role,)).fetchone()
                ok = row is None or row[0] == holder or row[1] <= t
                if ok:
                    self.db.execute("INSERT OR REPLACE INTO leases (role, holder, expires_at) VALUES (?,?,?)",
                                    (role, holder, t + ttl_s))
                self.db.execute("COMMIT")
                return ok
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def resign(self, role: str, holder: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM leases WHERE role=? AND holder=?", (role, holder))

    def live_workers(self) -> list[dict]:
        with self._lock:
            rows = self.db.execute("SELECT info FROM workers WHERE expires_at > ?", (now(),)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self.db.close()


def open_store(settings) -> JobStore:
    """The store the settings ask for: Redis if a URL is set, else SQLite in the data dir."""
    if settings.redis_url:
        return RedisJobStore(settings.redis_url, settings.key_prefix)
    return SqliteJobStore(Path(settings.data_dir) / "jobs.sqlite3")
