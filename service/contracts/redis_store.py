"""The Redis backend of both stores (production: the API processes and every worker share it).

:class:`RedisJobStore` implements :class:`~.store.JobStore` and :class:`RedisDatasetStore`
implements :class:`~.datasets.DatasetStore` on one Redis and one key prefix. Every
read-modify-write is a ``WATCH``/``MULTI`` transaction retried on conflict, or a Lua script,
so any number of processes may write at once.
"""
from __future__ import annotations

import json

from .datasets import DatasetFile, DatasetQuota, DatasetRecord, DatasetStore
from .records import JobRecord, now
from .store import InFlightLimit, JobStore, Mutator

__all__ = ["RedisJobStore", "RedisDatasetStore"]


class _RedisClient:
    """One connection and the key naming (``<prefix>:<part>:...``) of a store."""

    def __init__(self, url: str, key_prefix: str = "congeal"):
        import redis  # imported here so the embedded mode never needs the package at all

        self._redis_mod = redis
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=30)
        self.p = key_prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    def _optimistic(self, attempt):
        """``attempt(pipe)`` (WATCH, read, MULTI, write, EXECUTE), run again until no watched key
        changed under it; returns what it returns."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    return attempt(pipe)
                except self._redis_mod.WatchError:
                    continue  # another writer changed a watched key meanwhile: read again, apply again

    def close(self) -> None:
        self.r.close()


class RedisJobStore(_RedisClient, JobStore):
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

    def ping(self) -> None:
        self.r.ping()

    def insert(self, rec: JobRecord, max_in_flight: int | None = None) -> tuple[JobRecord, bool]:
        jk = self._k("job", rec.id)
        ik = self._k("idem", rec.owner, rec.idempotency_key) if rec.idempotency_key else None
        ak = self._k("owner", rec.owner, "active")

        def attempt(pipe):
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

        return self._optimistic(attempt)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(self._k("job", job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    def update(self, job_id: str, fn: Mutator) -> tuple[JobRecord | None, bool]:
        jk = self._k("job", job_id)

        def attempt(pipe):
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

        return self._optimistic(attempt)

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


class RedisDatasetStore(_RedisClient, DatasetStore):
    """Keys under the job store's prefix: ``<p>:dataset:<id>`` (record, JSON),
    ``<p>:dataset:<id>:files`` (hash: name -> file JSON), ``<p>:owner:<o>:datasets``
    (sorted by creation), ``<p>:datasets`` (every id, for the sweep)."""

    def insert(self, rec: DatasetRecord, files: list[DatasetFile], max_per_owner: int | None = None) -> None:
        ok = self._k("owner", rec.owner, "datasets")

        def attempt(pipe):
            if max_per_owner is not None:
                pipe.watch(ok)  # a racing insert changes the set: this one retries
                count = pipe.zcard(ok)
                if count >= max_per_owner:
                    pipe.unwatch()
                    raise DatasetQuota(count)
            pipe.multi()
            pipe.set(self._k("dataset", rec.id), rec.model_dump_json())
            if files:
                pipe.hset(self._k("dataset", rec.id, "files"),
                          mapping={f.name: f.model_dump_json() for f in files})
            pipe.zadd(ok, {rec.id: rec.created_at})
            pipe.sadd(self._k("datasets"), rec.id)
            pipe.execute()

        self._optimistic(attempt)

    def get(self, dataset_id: str) -> DatasetRecord | None:
        raw = self.r.get(self._k("dataset", dataset_id))
        return None if raw is None else DatasetRecord.model_validate_json(raw)

    def files(self, dataset_id: str, names: list[str] | None = None) -> dict[str, DatasetFile]:
        fk = self._k("dataset", dataset_id, "files")
        if names is None:
            return {k.decode(): DatasetFile.model_validate_json(v) for k, v in self.r.hgetall(fk).items()}
        vals = self.r.hmget(fk, names) if names else []
        return {n: DatasetFile.model_validate_json(v) for n, v in zip(names, vals) if v is not None}

    def transact(self, dataset_id, fn, names=()):
        dk, fk = self._k("dataset", dataset_id), self._k("dataset", dataset_id, "files")

        def attempt(pipe):
            pipe.watch(dk, fk)
            raw = pipe.get(dk)
            if raw is None:
                pipe.unwatch()
                return None, {}, False
            rec = DatasetRecord.model_validate_json(raw)
            if names is None:
                files = {k.decode(): DatasetFile.model_validate_json(v) for k, v in pipe.hgetall(fk).items()}
            else:
                vals = pipe.hmget(fk, list(names)) if names else []
                files = {n: DatasetFile.model_validate_json(v) for n, v in zip(names, vals) if v is not None}
            out = fn(rec, files)
            if out is None:
                pipe.unwatch()
                return rec, files, False
            new_rec, new_files = out
            pipe.multi()
            if new_rec is not None:
                pipe.set(dk, new_rec.model_dump_json())
            if new_files:
                pipe.hset(fk, mapping={n: f.model_dump_json() for n, f in new_files.items()})
            pipe.execute()
            return new_rec or rec, {**files, **(new_files or {})}, True

        return self._optimistic(attempt)

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[DatasetRecord], int]:
        zk = self._k("owner", owner, "datasets")
        total = self.r.zcard(zk)
        if offset >= total or limit <= 0:
            return [], total
        ids = [i.decode() for i in self.r.zrevrange(zk, offset, offset + limit - 1)]
        raws = self.r.mget([self._k("dataset", i) for i in ids]) if ids else []
        return [DatasetRecord.model_validate_json(x) for x in raws if x is not None], total

    def all_ids(self) -> list[str]:
        return sorted(i.decode() for i in self.r.smembers(self._k("datasets")))

    def delete(self, dataset_id: str) -> None:
        rec = self.get(dataset_id)
        with self.r.pipeline() as pipe:
            pipe.delete(self._k("dataset", dataset_id), self._k("dataset", dataset_id, "files"))
            pipe.srem(self._k("datasets"), dataset_id)
            if rec is not None:
                pipe.zrem(self._k("owner", rec.owner, "datasets"), dataset_id)
            pipe.execute()
