"""Start the API in a child uvicorn process on a loopback port, for benchmarks and tests.

Not used by the product itself; stdlib only (no httpx), so importing it costs nothing.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["free_port", "start_api", "server_log"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(env: dict, *, port: int | None = None, workers: int = 1, access_log: bool = True,
              cwd: str | Path | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``uvicorn service.app:app`` with ``env``; returns ``(process, base_url)`` once ``/healthz`` answers 200.

    The child's stderr goes to an unnamed temporary file (read it with :func:`server_log`), never
    to a pipe: a pipe nobody reads until the end fills after ~64 KiB, and then the server blocks
    on its next log line and stops answering (a few dozen tracebacks did that to the fuzz run).
    Raises ``RuntimeError`` with the child's stderr if it exits or does not answer in ``timeout_s``.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    if not access_log:
        cmd.append("--no-access-log")
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen(cmd, env=env, cwd=None if cwd is None else str(cwd), stdout=subprocess.DEVNULL,
                            stderr=log)
    proc.log = log  # type: ignore[attr-defined]
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
            raise RuntimeError(f"server did not start:\n{server_log(proc)}")
        time.sleep(0.2)


def server_log(proc: subprocess.Popen) -> str:
    """Everything a server from :func:`start_api` has written to stderr so far."""
    log = proc.log  # type: ignore[attr-defined]
    log.flush()
    log.seek(0)
    return log.read()
