"""What the workers did, as running totals every API process can export (``GET /metrics``).

Each attempt of a job that a runner ran adds, when it ends, one to ``attempts`` under its kind and
outcome, and its wall time times the devices it held to ``device_seconds`` under its kind and
device type. The totals live beside the jobs (the same Redis and key prefix, or the same SQLite
file), so they are the same whichever API process is scraped and survive restarts. An attempt
whose worker was killed outright is not counted: nobody was left to add it.

Shared by the API and the workers; no FastAPI, no torch.
"""
from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from .records import JobKind, JobRecord, JobStatus

__all__ = ["UsageStore", "RedisUsageStore", "SqliteUsageStore", "open_usage_store", "attempt_usage"]


class UsageStore(ABC):
    """Named running totals: ``(name, labels) -> float``."""

    @abstractmethod
    def add(self, amounts: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        """Add every amount, all or none."""

    @abstractmethod
    def totals(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]: ...

    def close(self) -> None:  # pragma: no cover - trivial
        pass


def _field(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    # Label values are ours (kinds, outcomes, device types): never '|' or '='.
    return "|".join([name, *(f"{k}={v}" for k, v in labels)])


def _parse(field: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    name, *labels = field.split("|")
    return name, tuple(tuple(x.split("=", 1)) for x in labels)  # type: ignore[misc]


class RedisUsageStore(UsageStore):
    """One hash, ``P:usage``, incremented with HINCRBYFLOAT in one transaction."""

    def __init__(self, url: str, key_prefix: str = "congeal"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.key = f"{key_prefix}:usage"

    def add(self, amounts) -> None:
        pipe = self.r.pipeline(transaction=True)
        for (name, labels), v in amounts.items():
            pipe.hincrbyfloat(self.key, _field(name, labels), float(v))
        pipe.execute()

    def totals(self):
        return {_parse(k.decode()): float(v) for k, v in self.r.hgetall(self.key).items()}

    def close(self) -> None:
        self.r.close()


class SqliteUsageStore(UsageStore):
    """A ``usage`` table in the embedded job store's file."""

    def __init__(self, path: str | Path):
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        with self._lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS usage (field TEXT PRIMARY KEY, value REAL NOT NULL)")

    def add(self, amounts) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for (name, labels), v in amounts.items():
                    self.db.execute("INSERT INTO usage VALUES (?, ?) ON CONFLICT(field) DO UPDATE "
                                    "SET value = value + excluded.value", (_field(name, labels), float(v)))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def totals(self):
        with self._lock:
            return {_parse(k): float(v) for k, v in self.db.execute("SELECT field, value FROM usage")}

    def close(self) -> None:
        self.db.close()


def open_usage_store(settings) -> UsageStore:
    """Beside the jobs: the same Redis and key prefix, or the same SQLite file."""
    if settings.redis_url:
        return RedisUsageStore(settings.redis_url, settings.key_prefix)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return SqliteUsageStore(Path(settings.data_dir) / "jobs.sqlite3")


def _device_type(device: str | None) -> str:
    return (device or "unknown").split(":", 1)[0]


def attempt_usage(rec: JobRecord, worker: str, configured_device: str):
    """What the last attempt ``worker`` ran of this job adds to the totals (empty if it has not ended).

    The device is the one the job reports using (a succeeded job's metrics), else the worker's
    configured ``CONGEAL_DEVICE`` (``auto`` when it was left to the job).
    """
    mine = [a for a in rec.attempts if a.worker == worker and a.ended_at is not None]
    if not mine:
        return {}
    a = max(mine, key=lambda x: x.n)
    reported = (rec.result or {}).get("device") if rec.status == JobStatus.succeeded else None
    device = _device_type(reported or configured_device)
    devices = rec.options.gpus if rec.kind == JobKind.align else 1
    seconds = max(0.0, a.ended_at - a.started_at)
    kind = rec.kind.value
    return {("attempts", (("kind", kind), ("outcome", a.outcome or "unknown"))): 1.0,
            ("device_seconds", (("kind", kind), ("device", device))): seconds * devices}
