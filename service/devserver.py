"""Start the API in a child uvicorn process on a loopback port, for benchmarks and tests.

Not used by the product itself; stdlib only (no httpx), so importing it costs nothing.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["free_port", "start_api"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(env: dict, *, port: int | None = None, workers: int = 1, access_log: bool = True,
              cwd: str | Path | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``uvicorn service.app:app`` with ``env``; returns ``(process, base_url)`` once ``/healthz`` answers 200.

    The child's stderr is a text pipe (read it after stopping the process).
    Raises ``RuntimeError`` with the child's stderr if it exits or does not answer in ``timeout_s``.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    if not access_log:
        cmd.append("--no-access-log")
    proc = subprocess.Popen(cmd, env=env, cwd=None if cwd is None else str(cwd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"server did not start:\n{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)
