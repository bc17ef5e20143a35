"""Container healthcheck: ``python -m worker.health`` exits 0 if a worker on this host is alive.

Alive means its main process wrote a heartbeat to the job store within the
heartbeat TTL (see ``service.execution.maintenance.Maintenance``). This checks what
``/readyz`` relies on, and costs one Redis read instead of a broker-wide
``celery inspect ping`` broadcast.
"""
from __future__ import annotations

import socket
import sys

from service.contracts import Settings, open_store


def main() -> int:
    host = socket.gethostname()
    try:
        workers = open_store(Settings()).live_workers()
    except Exception as e:
        print(f"unhealthy: job store unreachable ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    mine = [w["name"] for w in workers if w.get("name", "").endswith("@" + host)]
    if not mine:
        print(f"unhealthy: no recent heartbeat from a worker on {host}", file=sys.stderr)
        return 1
    print("healthy: " + ", ".join(mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
