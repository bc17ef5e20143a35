"""A small standard-library client for the API (what ``congeal demo`` uses).

Standard library only, so the demo needs nothing beyond the package itself.
"""
from __future__ import annotations

import hashlib
import json
import mimetypes
import time
import urllib.error
import urllib.parse
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
    def __init__(self, base_url: str, timeout: float = 120.0, headers: dict | None = None):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = dict(headers or {})  # sent with every request (an API key, say)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={**self.headers, **(headers or {})})
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

    def create_dataset(self, paths: list[Path], label: str | None = None, checksums: bool = True) -> dict:
        """``POST /datasets`` declaring ``paths`` (sizes, and SHA-256s if ``checksums``)."""
        files = []
        for p in map(Path, paths):
            entry = {"name": p.name, "size": p.stat().st_size}
            if checksums:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                entry["sha256"] = h.hexdigest()
            files.append(entry)
        body = json.dumps({"files": files, **({"label": label} if label else {})}).encode()
        return json.loads(self.request("POST", "/datasets", body, {"Content-Type": "application/json"})[1])

    def upload_dataset_files(self, dataset_id: str, paths: list[Path], chunk_bytes: int = 8 << 20,
                             headers: dict | None = None) -> dict:
        """Send every file's missing bytes in chunks, resuming each file where the server says
        it stands (so calling this again after a dropped connection continues the upload)."""
        ds = self.get(f"/datasets/{dataset_id}")
        have = {f["name"]: f["received"] for f in ds["files"]}
        for p in map(Path, paths):
            size = p.stat().st_size
            offset = have[p.name]
            with open(p, "rb") as f:
                f.seek(offset)
                while offset < size:
                    chunk = f.read(chunk_bytes)
                    h = {"Content-Range": f"bytes {offset}-{offset + len(chunk) - 1}/{size}",
                         "Content-Type": "application/octet-stream", **(headers or {})}
                    self.request("PUT", f"/datasets/{dataset_id}/files/{urllib.parse.quote(p.name)}", chunk, h)
                    offset += len(chunk)
        return self.get(f"/datasets/{dataset_id}")

    def complete_dataset(self, dataset_id: str, timeout: float = 3600, every: float = 0.5) -> dict:
        """``POST .../complete``, then wait until the dataset is ``ready`` or ``invalid``."""
        self.request("POST", f"/datasets/{dataset_id}/complete")
        deadline = time.monotonic() + timeout
        while True:
            ds = self.get(f"/datasets/{dataset_id}")
            if ds["state"] in ("ready", "invalid"):
                return ds
            if time.monotonic() > deadline:
                raise TimeoutError(f"dataset {dataset_id} still {ds['state']} after {timeout} s")
            time.sleep(every)

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
