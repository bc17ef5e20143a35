"""Bounded load run against the API on loopback: N pollers and M uploaders for T seconds.

    python bench/load.py --pollers 50 --uploaders 4 --seconds 30            # embedded server
    python bench/load.py --redis-url redis://127.0.0.1:6379/12 ...          # Redis-backed server

It starts its own ``uvicorn service.app:app`` on 127.0.0.1 (a free port, a fresh data dir, one
API key it generates), seeds a few jobs, then runs the clients with httpx on asyncio until the
time is up, and prints p50/p99 latency per request kind, status counts and error count as JSON.
In Redis mode no worker consumes the run's queue (its key prefix and queue are unique), so
uploads stay queued and the run measures the API and Redis; the keys are deleted afterwards.
Nothing listens on or connects to any address but 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.devserver import start_api  # noqa: E402
SAMPLES = sorted((ROOT / "congeal" / "samples").glob("*.png"))


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


class Stats:
    def __init__(self):
        self.lat: dict[str, list[float]] = {}
        self.codes: dict[str, dict[str, int]] = {}
        self.exceptions: dict[str, int] = {}

    def add(self, kind: str, seconds: float, code: int | str) -> None:
        self.lat.setdefault(kind, []).append(seconds)
        c = self.codes.setdefault(kind, {})
        c[str(code)] = c.get(str(code), 0) + 1

    def summary(self) -> dict:
        out = {}
        for kind, xs in self.lat.items():
            codes = self.codes[kind]
            errors = sum(n for c, n in codes.items() if not c.startswith("2") and c != "429")
            out[kind] = {"requests": len(xs), "p50_ms": round(1000 * _pct(xs, 0.5), 1),
                         "p99_ms": round(1000 * _pct(xs, 0.99), 1), "max_ms": round(1000 * max(xs), 1),
                         "status": dict(sorted(codes.items())), "errors": errors,
                         "throttled_429": codes.get("429", 0)}
        return out


async def _timed(stats: Stats, kind: str, coro):
    t0 = time.perf_counter()
    try:
        r = await coro
        stats.add(kind, time.perf_counter() - t0, r.status_code)
        return r
    except httpx.HTTPError as e:
        stats.add(kind, time.perf_counter() - t0, type(e).__name__)
        return None


def _upload_files(n: int) -> list:
    pick = random.sample(SAMPLES, n)
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in pick]


async def run_clients(base: str, key: str, pollers: int, uploaders: int, seconds: float,
                      images: int, upload_every_s: float) -> dict:
    stats = Stats()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=pollers + uploaders + 8, max_keepalive_connections=pollers + uploaders)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as c:
        job_ids = []
        for _ in range(3):  # something to poll from the first second on
            r = await c.post("/jobs", files=_upload_files(images), data={"budget": "1"})
            r.raise_for_status()
            job_ids.append(r.json()["id"])
        stop_at = time.monotonic() + seconds

        async def poller(i: int):
            rnd = random.Random(i)
            while time.monotonic() < stop_at:
                if rnd.random() < 0.1:
                    await _timed(stats, "list", c.get("/jobs", params={"limit": 20}))
                else:
                    await _timed(stats, "poll", c.get(f"/jobs/{rnd.choice(job_ids)}"))

        async def uploader(i: int):
            while time.monotonic() < stop_at:
                r = await _timed(stats, "upload", c.post("/jobs", files=_upload_files(images),
                                                         data={"budget": "1"}))
                if r is not None and r.status_code == 202:
                    job_ids.append(r.json()["id"])
                await asyncio.sleep(upload_every_s)

        t0 = time.monotonic()
        await asyncio.gather(*[poller(i) for i in range(pollers)], *[uploader(i) for i in range(uploaders)])
        wall = time.monotonic() - t0
        health = (await c.get("/healthz")).status_code
    out = {"wall_s": round(wall, 1), "by_kind": stats.summary(), "healthz_after": health,
           "jobs_created": len(job_ids)}
    out["total_requests"] = sum(len(x) for x in stats.lat.values())
    out["total_errors"] = sum(k["errors"] for k in out["by_kind"].values())
    out["throughput_rps"] = round(out["total_requests"] / wall, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--uploaders", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--images", type=int, default=4, help="images per upload (bundled samples, 28x28)")
    ap.add_argument("--upload-every", type=float, default=0.5, help="pause between one uploader's uploads, s")
    ap.add_argument("--redis-url", default=None, help="Redis-backed server (must be on 127.0.0.1)")
    ap.add_argument("--uvicorn-workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.redis_url and not a.redis_url.startswith(("redis://127.0.0.1", "redis://localhost")):
        ap.error("--redis-url must be on loopback")

    key = secrets.token_urlsafe(24)
    tag = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="congeal-load-") as data:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONGEAL_")}
        env.update(CONGEAL_DATA_DIR=data, CONGEAL_API_KEYS=f"bench:{hashlib.sha256(key.encode()).hexdigest()}",
                   CONGEAL_DEVICE="cpu", CONGEAL_MAX_JOBS_IN_FLIGHT_PER_KEY="1000000",
                   CONGEAL_RATE_LIMIT_PER_MINUTE="0", CONGEAL_JOB_TTL_S="3600")
        if a.redis_url:
            env.update(CONGEAL_REDIS_URL=a.redis_url, CONGEAL_KEY_PREFIX=f"congeal-load-{tag}",
                       CONGEAL_QUEUE=f"congeal-load-{tag}")
        try:
            server, base = start_api(env, workers=a.uvicorn_workers, access_log=False, cwd=ROOT)
        except RuntimeError as e:
            raise SystemExit(str(e))
        try:
            result = asyncio.run(run_clients(base, key, a.pollers, a.uploaders, a.seconds, a.images,
                                             a.upload_every))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            if a.redis_url:
                import redis

                r = redis.Redis.from_url(a.redis_url)
                ks = list(r.scan_iter(match=f"congeal-load-{tag}*", count=1000))
                if ks:
                    r.delete(*ks)
    result["config"] = {"pollers": a.pollers, "uploaders": a.uploaders, "seconds": a.seconds, "images": a.images,
                        "upload_every_s": a.upload_every, "mode": "redis" if a.redis_url else "embedded",
                        "uvicorn_workers": a.uvicorn_workers}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if result["total_errors"] == 0 and result["healthz_after"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
