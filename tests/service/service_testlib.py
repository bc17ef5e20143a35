"""Helpers for the service tests (imported by conftest and the test modules).

Isolation: Redis DB 13, and a key prefix and queue names unique to each
:class:`Env`, so a concurrent run or another Redis user is never touched.
Only keys under an Env's prefix and its queues are deleted at the end.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from service.contracts import RedisJobStore, Settings
from service.contracts.settings import hash_api_key

REDIS_URL = os.environ.get("CONGEAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
SAMPLES = sorted((Path(__file__).resolve().parents[2] / "congeal" / "samples").glob("*.png"))
TERMINAL = {"succeeded", "failed", "cancelled"}
# Two tenants. Only the hashes go into the service's settings, as an operator would configure it.
KEYS = {"alice": "ak-alice-5f0c2e9b7d4a41c3", "bob": "ak-bob-91d3b6e0a2c84f7e"}
API_KEYS = ",".join(f"{t}:{hash_api_key(k)}" for t, k in KEYS.items())


def auth(tenant: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


class Env:
    """One isolated service configuration: its own key prefix, queues and data dir."""

    def __init__(self, root: Path, tag: str, **overrides):
        self.tag = tag
        self.data_dir = root / f"data-{tag}"
        self.vars = {
            "CONGEAL_REDIS_URL": REDIS_URL,
            "CONGEAL_KEY_PREFIX": f"congeal-test-{tag}",
            "CONGEAL_QUEUE": f"congeal-test-{tag}",
            "CONGEAL_DATA_DIR": str(self.data_dir),
            "CONGEAL_DEVICE": "cpu",
            "CONGEAL_CHECKPOINT_EVERY_S": "0",  # a checkpoint every epoch: recovery tests need one early
            "CONGEAL_LEASE_TTL_S": "4",
            "CONGEAL_RECONCILE_INTERVAL_S": "1",
            "CONGEAL_VISIBILITY_TIMEOUT_S": "20",  # short, so broker redelivery also happens within a test
            "CONGEAL_CANCEL_GRACE_S": "3",
            "CONGEAL_SYNC_INFERENCE_MAX_IMAGES": "4",
            "CONGEAL_SYNC_INFERENCE_TIMEOUT_S": "90",
            "CONGEAL_API_KEYS": API_KEYS,
        }
        self.vars.update({f"CONGEAL_{k.upper()}": str(v) for k, v in overrides.items()})

    def settings(self, **overrides) -> Settings:
        kw = {k[len("CONGEAL_"):].lower(): v for k, v in self.vars.items()}
        kw.update(overrides)
        return Settings(**kw)

    def store(self) -> RedisJobStore:
        return RedisJobStore(self.vars["CONGEAL_REDIS_URL"], self.vars["CONGEAL_KEY_PREFIX"])

    def cleanup(self, r: redis.Redis) -> None:
        prefix = self.vars["CONGEAL_KEY_PREFIX"]
        q = self.vars["CONGEAL_QUEUE"]
        # A SIGKILLed worker's message stays in kombu's shared 'unacked' hash, and a later
        # consumer of this DB would restore it onto our (deleted) queue: drop it here.
        for tag, val in r.hscan_iter("unacked"):
            if q.encode() in val:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        keys += [q, f"{q}.inference"]
        keys += list(r.scan_iter(match=f"_kombu.binding*.{q}*", count=1000))
        if keys:
            r.delete(*keys)


class Worker:
    """A real ``celery worker`` process (prefork, one child) in its own process group."""

    def __init__(self, env: Env, name: str, log_dir: Path, queues: list[str] | None = None):
        self.env, self.name = env, name
        self.log_path = log_dir / f"worker-{name}.log"
        q = env.vars["CONGEAL_QUEUE"]
        queues = queues or [q, f"{q}.inference"]
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1",
               "-Q", ",".join(queues), "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
               "--loglevel=INFO"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env.vars}, stdout=self._log, stderr=self._log,
                                     start_new_session=True, cwd=str(log_dir))

    def wait_ready(self, timeout: float = 90) -> None:
        store = self.env.store()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if any(w.get("name", "").startswith(self.name + "@") for w in store.live_workers()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.name} sent no heartbeat in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool child): no chance to clean up."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        self._log.close()


def files_for(paths, field: str = "files"):
    return [(field, (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wait_job(client, job_id: str, until=lambda j: j["status"] in TERMINAL, timeout: float = 240,
             seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = client.get(f"/jobs/{job_id}").json()
        if seen is not None:
            seen.append(j)
        if until(j):
            return j
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not get there in {timeout} s; last: {j}")
        time.sleep(0.25)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: it no longer computes anything)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def bilinear_backward(img: np.ndarray, H, out_hw, fill) -> np.ndarray:
    """The published convention, independently: ``out(p) = in(H p)``, bilinear between
    pixel centres at integer coordinates, samples outside the input take ``fill``.
    ``img``: (h, w) uint8 -> (Ho, Wo) float in 0..255."""
    h, w = img.shape
    src = img.astype(np.float64)
    Ho, Wo = out_hw
    ys, xs = np.mgrid[0:Ho, 0:Wo].astype(np.float64)
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])  # (3, Ho*Wo)
    q = np.asarray(H, np.float64) @ pts
    u, v = q[0] / q[2], q[1] / q[2]
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fx, fy = u - x0, v - y0

    def at(xi, yi):
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = np.full(xi.shape, float(fill), np.float64)
        vals[inside] = src[yi[inside], xi[inside]]
        return vals

    out = (at(x0, y0) * (1 - fx) * (1 - fy) + at(x0 + 1, y0) * fx * (1 - fy)
           + at(x0, y0 + 1) * (1 - fx) * fy + at(x0 + 1, y0 + 1) * fx * fy)
    return out.reshape(Ho, Wo)


def tar_bytes(members, mode: str = "w") -> bytes:
    """A tar archive in memory: ``(name, data)`` members, or prepared ``tarfile.TarInfo`` ones
    (links, devices); ``mode`` picks the compression (``"w:gz"``, ``"w:xz"``, ...)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()
