"""A small standard-library client for the API (what ``congeal demo`` uses).

Standard library only, so the demo needs nothing beyond the package itself.
"""
from __future__ import annotations

import json
import mimetypes
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["Client", "ApiError"]


class ApiError(RuntimeError):
    def __init__(self, status: int, detail):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, base_url: str, timeout: float = 120.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except ValueError:
                detail = raw.decode(errors="replace")
            raise ApiError(e.code, detail) from None

    def get(self, path: str) -> dict:
        return json.loads(self.request("GET", path)[1])

    def upload(self, path: str, files: list[Path], fields: dict | None = None,
               headers: dict | None = None) -> dict:
        """POST ``files`` (as ``files`` parts) and ``fields`` as multipart/form-data."""
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for k, v in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for f in files:
            ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{f.name}"\r\n'
                         f'Content-Type: {ctype}\r\n\r\n'.encode() + Path(f).read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        h = {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})}
        return json.loads(self.request("POST", path, body, h)[1])

    def download(self, path: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.request("GET", path)[1])
        return dest

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None, timeout: float = 3600,
             every: float = 0.5) -> dict:
        """Poll a job until it ends; ``on_update`` sees each poll's job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/jobs/{job_id}")
            if on_update is not None:
                on_update(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(every)
