"""The SQLite backend of both stores (embedded mode: one file in the data dir, ``jobs.sqlite3``).

:class:`SqliteJobStore` implements :class:`~.store.JobStore` and :class:`SqliteDatasetStore`
implements :class:`~.datasets.DatasetStore`, in tables of the same file, each with its own
connection. A connection guarded by a lock serves every thread of the process; ``BEGIN
IMMEDIATE`` makes each read-modify-write atomic against the other connection and other
processes too. Records survive a restart.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from .datasets import DatasetFile, DatasetQuota, DatasetRecord, DatasetStore
from .records import JobRecord, now
from .store import InFlightLimit, JobStore, Mutator

__all__ = ["SqliteJobStore", "SqliteDatasetStore"]

_JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,
    terminal INTEGER NOT NULL, idem_key TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS workers (name TEXT PRIMARY KEY, expires_at REAL, info TEXT);
CREATE TABLE IF NOT EXISTS leases (role TEXT PRIMARY KEY, holder TEXT, expires_at REAL);
"""
_DATASETS_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS datasets_owner ON datasets (owner, created_at DESC);
CREATE TABLE IF NOT EXISTS dataset_files (
    dataset_id TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (dataset_id, name));
"""


class _SqliteFile:
    """One connection to the store's file (write-ahead log on), its lock, and its tables."""

    def __init__(self, path: str | Path, schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(schema)

    @contextmanager
    def _transaction(self):
        """One ``BEGIN IMMEDIATE`` transaction under the lock: committed when the block ends (by a
        ``return`` too), rolled back if it raises, so a refusal raised inside writes nothing."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.close()


class SqliteJobStore(_SqliteFile, JobStore):
    """Embedded mode: one file in the data dir, so job records survive a restart.

    A single connection guarded by a lock serves every thread of the process;
    ``BEGIN IMMEDIATE`` makes each update atomic against other processes too.
    """

    def __init__(self, path: str | Path):
        super().__init__(path, _JOBS_SCHEMA)

    def ping(self) -> None:
        with self._lock:
            self.db.execute("SELECT 1").fetchone()

    def insert(self, rec: JobRecord, max_in_flight: int | None = None) -> tuple[JobRecord, bool]:
        with self._transaction():
            if rec.idempotency_key:
                row = self.db.execute("SELECT data FROM jobs WHERE owner=? AND idem_key=?",
                                      (rec.owner, rec.idempotency_key)).fetchone()
                if row:
                    return JobRecord.model_validate_json(row[0]), False
            if max_in_flight is not None:
                count = self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND terminal=0",
                                        (rec.owner,)).fetchone()[0]
                if count >= max_in_flight:
                    raise InFlightLimit(count)
            self.db.execute(
                "INSERT INTO jobs (id, owner, created_at, terminal, idem_key, data) VALUES (?,?,?,?,?,?)",
                (rec.id, rec.owner, rec.created_at, int(rec.terminal), rec.idempotency_key,
                 rec.model_dump_json()))
            return rec, True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self.db.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else JobRecord.model_validate_json(row[0])

    def update(self, job_id: str, fn: Mutator) -> tuple[JobRecord | None, bool]:
        with self._transaction():
            row = self.db.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None, False
            rec = JobRecord.model_validate_json(row[0])
            new = fn(rec)
            if new is None:
                return rec, False
            self.db.execute("UPDATE jobs SET data=?, terminal=? WHERE id=?",
                            (new.model_dump_json(), int(new.terminal), job_id))
            return new, True

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
        with self._transaction():
            t = now()
            row = self.db.execute("SELECT holder, expires_at FROM leases WHERE role=?", (role,)).fetchone()
            ok = row is None or row[0] == holder or row[1] <= t
            if ok:
                self.db.execute("INSERT OR REPLACE INTO leases (role, holder, expires_at) VALUES (?,?,?)",
                                (role, holder, t + ttl_s))
            return ok

    def resign(self, role: str, holder: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM leases WHERE role=? AND holder=?", (role, holder))

    def live_workers(self) -> list[dict]:
        with self._lock:
            rows = self.db.execute("SELECT info FROM workers WHERE expires_at > ?", (now(),)).fetchall()
        return [json.loads(r[0]) for r in rows]


class SqliteDatasetStore(_SqliteFile, DatasetStore):
    """Embedded mode: two tables in the job store's SQLite file (its own connection;
    ``BEGIN IMMEDIATE`` makes each transaction atomic against the jobs' connection too)."""

    def __init__(self, path: str | Path):
        super().__init__(path, _DATASETS_SCHEMA)

    def insert(self, rec: DatasetRecord, files: list[DatasetFile], max_per_owner: int | None = None) -> None:
        with self._transaction():
            if max_per_owner is not None:
                count = self.db.execute("SELECT COUNT(*) FROM datasets WHERE owner=?", (rec.owner,)).fetchone()[0]
                if count >= max_per_owner:
                    raise DatasetQuota(count)
            self.db.execute("INSERT INTO datasets (id, owner, created_at, data) VALUES (?,?,?,?)",
                            (rec.id, rec.owner, rec.created_at, rec.model_dump_json()))
            self.db.executemany("INSERT INTO dataset_files (dataset_id, name, data) VALUES (?,?,?)",
                                [(rec.id, f.name, f.model_dump_json()) for f in files])

    def get(self, dataset_id: str) -> DatasetRecord | None:
        with self._lock:
            row = self.db.execute("SELECT data FROM datasets WHERE id=?", (dataset_id,)).fetchone()
        return None if row is None else DatasetRecord.model_validate_json(row[0])

    def _files(self, dataset_id: str, names) -> dict[str, DatasetFile]:
        if names is None:
            rows = self.db.execute("SELECT name, data FROM dataset_files WHERE dataset_id=?", (dataset_id,)).fetchall()
        else:
            rows = []
            for n in names:
                rows += self.db.execute("SELECT name, data FROM dataset_files WHERE dataset_id=? AND name=?",
                                        (dataset_id, n)).fetchall()
        return {n: DatasetFile.model_validate_json(d) for n, d in rows}

    def files(self, dataset_id: str, names: list[str] | None = None) -> dict[str, DatasetFile]:
        with self._lock:
            return self._files(dataset_id, names)

    def transact(self, dataset_id, fn, names=()):
        with self._transaction():
            row = self.db.execute("SELECT data FROM datasets WHERE id=?", (dataset_id,)).fetchone()
            if row is None:
                return None, {}, False
            rec = DatasetRecord.model_validate_json(row[0])
            files = self._files(dataset_id, names)
            out = fn(rec, files)
            if out is None:
                return rec, files, False
            new_rec, new_files = out
            if new_rec is not None:
                self.db.execute("UPDATE datasets SET data=? WHERE id=?", (new_rec.model_dump_json(), dataset_id))
            for n, f in (new_files or {}).items():
                self.db.execute("UPDATE dataset_files SET data=? WHERE dataset_id=? AND name=?",
                                (f.model_dump_json(), dataset_id, n))
            return new_rec or rec, {**files, **(new_files or {})}, True

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[DatasetRecord], int]:
        with self._lock:
            total = self.db.execute("SELECT COUNT(*) FROM datasets WHERE owner=?", (owner,)).fetchone()[0]
            if offset >= total or limit <= 0:
                return [], total
            rows = self.db.execute("SELECT data FROM datasets WHERE owner=? ORDER BY created_at DESC, id DESC "
                                   "LIMIT ? OFFSET ?", (owner, limit, offset)).fetchall()
        return [DatasetRecord.model_validate_json(r[0]) for r in rows], total

    def all_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT id FROM datasets ORDER BY id")]

    def delete(self, dataset_id: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM dataset_files WHERE dataset_id=?", (dataset_id,))
            self.db.execute("DELETE FROM datasets WHERE id=?", (dataset_id,))
