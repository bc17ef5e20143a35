"""How long small service jobs take from queued to done, with and without the spare training child.

Embedded mode (one job thread, SQLite, no Redis), the API in-process: ``--jobs`` jobs of the
bundled 48 sample digits (least-squares congealing, 2 iterations, or ``--method dprc --budget B``),
queued one after the other; each job's attempt (child start to result) and its queued-to-done time.
The first job always starts a fresh child; with ``CONGEAL_WARM_CHILD`` (the default) the next ones
run in the child started ahead.

    python bench/job_latency.py --jobs 5 --out latency.jsonl            # warm (the default)
    python bench/job_latency.py --jobs 5 --cold --out latency.jsonl     # a fresh child per job
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = sorted((ROOT / "congeal" / "samples").glob("*.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="CONGEAL_WARM_CHILD=false")
    ap.add_argument("--method", default="lsc")
    ap.add_argument("--budget", default="2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    data = tempfile.mkdtemp(prefix="congeal-latency-")
    os.environ.update(CONGEAL_DATA_DIR=data, CONGEAL_DEVICE="cpu", CONGEAL_WARM_CHILD=str(not a.cold).lower())
    os.environ.pop("CONGEAL_REDIS_URL", None)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.contracts import Settings

    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES]
    rows = []
    with TestClient(create_app(Settings(allow_open=True))) as api:
        for i in range(a.jobs):
            t0 = time.time()
            jid = api.post("/jobs", files=files, data={"method": a.method, "budget": a.budget}).json()["id"]
            while (j := api.get(f"/jobs/{jid}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.05)
            at = j["attempts"][-1]
            rows.append({"job": i, "warm_child": not a.cold, "method": a.method, "budget": a.budget,
                         "status": j["status"], "queued_to_done_s": round(time.time() - t0, 3),
                         "attempt_s": round((datetime.fromisoformat(at["ended_at"])
                                             - datetime.fromisoformat(at["started_at"])).total_seconds(), 3)})
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(3)  # the next job is queued a little later, as a user's would be
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
