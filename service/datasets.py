"""Dataset uploads on the API side: chunks streamed to disk, completion, validation.

A chunk (``PUT /datasets/{id}/files/{name}`` with ``Content-Range: bytes a-b/total``) is
written where it belongs, block by block as it arrives, never held whole: at most one block
(``_BLOCK``) of it is in this process at a time. Only one request writes a file at a time (a
lease in the file's record, renewed while bytes keep coming), and a chunk must start exactly at
the bytes received so far, so a file on disk is always one unbroken prefix of the client's.
A request cut short keeps what reached the disk; the client asks ``GET /datasets/{id}`` for
``received`` and continues from there.

Completing a dataset hands it to :class:`DatasetChecker`: a thread that runs
``python -m service.dataset_check`` (bounded memory, killed past its time limit) and records
``ready`` or ``invalid``. The event loop never waits on any of it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .contracts import ArtifactStore, Settings, valid_dataset_id
from .contracts.datasets import DatasetFile, DatasetRecord, DatasetState, DatasetStore, jobs_in_flight
from .contracts.records import now
from .contracts.settings import IMAGE_FORMAT_EXTENSIONS
from .schemas import DatasetFilePublic, DatasetLinks, DatasetPublic, ts

__all__ = [
    "load_dataset",
    "parse_content_range",
    "receive_chunk",
    "complete_dataset",
    "DatasetChecker",
    "to_public",
    "file_public",
    "WRITE_LEASE_S",
]

log = logging.getLogger("congeal.datasets")

WRITE_LEASE_S = 30.0  # a chunk's writer that sent nothing for this long loses the file
_RENEW_S = 10.0  # a third of it
_BLOCK = 1 << 20  # bytes gathered before one write: bounds what a chunk holds in memory
# One thread: the check decodes one image at a time, and BLAS thread pools reserve memory the
# RLIMIT_DATA cap would count.
_CHECK_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")


def load_dataset(store: DatasetStore, owner: str, dataset_id: str) -> DatasetRecord:
    """The caller's dataset, or 404: another tenant's is reported missing, not forbidden."""
    rec = store.get(dataset_id) if valid_dataset_id(dataset_id) else None
    if rec is None or rec.owner != owner or rec.deleting:
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    return rec


def parse_content_range(value: str | None, content_length: str | None) -> tuple[int, int | None, int | None]:
    """``(start, length, total)`` of a chunk. No ``Content-Range``: the whole file from 0
    (length from ``Content-Length`` if sent). ``total`` is None for ``*``."""
    length = None
    if content_length is not None:
        if not content_length.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        length = int(content_length)
    if value is None:
        return 0, length, length
    m = _RANGE.fullmatch(value.strip())
    if not m:
        raise HTTPException(400, f"Content-Range {value!r} is not 'bytes <first>-<last>/<total or *>'")
    a, b = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if b < a:
        raise HTTPException(416, f"Content-Range {value!r}: the last byte comes before the first")
    if total is not None and b >= total:
        raise HTTPException(416, f"Content-Range {value!r}: the range ends beyond the file's {total} bytes")
    if length is not None and length != b - a + 1:
        raise HTTPException(400, f"Content-Length {length} does not match Content-Range {value!r} "
                                 f"({b - a + 1} bytes)")
    return a, b - a + 1, total


def _offset_conflict(name: str, f: DatasetFile, msg: str) -> HTTPException:
    return HTTPException(409, f"{name}: {msg}; the next chunk starts at offset {f.received}",
                         headers={"Upload-Offset": str(f.received)})


def _reserve(store: DatasetStore, settings: Settings, owner: str, dataset_id: str, name: str, start: int,
             length: int | None, total: int | None, token: str) -> tuple[DatasetFile, int]:
    """Take the file's write lease for a chunk at ``start``. Returns the file and the chunk's length."""
    out: dict[str, Any] = {}

    def fn(rec: DatasetRecord, files: dict[str, DatasetFile]):
        if rec.owner != owner or rec.deleting:
            raise HTTPException(404, f"no dataset with id {dataset_id!r}")
        if rec.state != DatasetState.uploading:
            raise HTTPException(409, f"dataset {dataset_id} is {rec.state.value}: it takes no more uploads")
        f = files.get(name)
        if f is None:
            raise HTTPException(404, f"dataset {dataset_id} has no file named {name!r} (files are declared "
                                     f"when the dataset is created)")
        if f.size is not None and total is not None and total != f.size:
            raise HTTPException(416, f"{name} was declared as {f.size} bytes; this chunk says {total}")
        size = f.size if f.size is not None else total
        if size is None:
            raise HTTPException(411, f"{name}: its size is unknown; declare it when creating the dataset or "
                                     f"send Content-Range: bytes a-b/<total>")
        n = length if length is not None else size - start
        if start + n > size:
            raise HTTPException(416, f"{name}: bytes {start}-{start + n - 1} lie beyond its {size} bytes")
        t = now()
        if f.writer is not None and (f.writer_until or 0) > t:
            raise _offset_conflict(name, f, "another request is writing a chunk of it now")
        if start != f.received:
            raise _offset_conflict(name, f, f"a chunk at offset {start} is not where the file stands")
        if f.received == size:
            raise _offset_conflict(name, f, "it is complete already")
        new_rec = None
        if f.size is None:
            declared = rec.bytes_declared + size
            if declared > settings.max_dataset_bytes:
                raise HTTPException(413, f"{name}: with it the dataset would hold {declared} bytes, above the "
                                         f"limit of {settings.max_dataset_bytes} bytes per dataset")
            new_rec = rec.model_copy(update={"bytes_declared": declared, "updated_at": t})
        f = f.model_copy(update={"size": size, "writer": token, "writer_until": t + WRITE_LEASE_S})
        out.update(file=f, n=n)
        return new_rec, {name: f}

    rec, _, _ = store.transact(dataset_id, fn, [name])
    if rec is None:
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    return out["file"], out["n"]


def _renew(store: DatasetStore, dataset_id: str, name: str, token: str) -> bool:
    def fn(rec, files):
        f = files.get(name)
        if f is None or f.writer != token:
            return None
        return None, {name: f.model_copy(update={"writer_until": now() + WRITE_LEASE_S})}

    return store.transact(dataset_id, fn, [name])[2]


def _release(store: DatasetStore, dataset_id: str, name: str, token: str, received: int) -> DatasetFile | None:
    """Record the bytes on disk and give the lease up; None if the lease had been lost."""

    def fn(rec, files):
        f = files.get(name)
        if f is None or f.writer != token:
            return None
        t = now()
        return (rec.model_copy(update={"updated_at": t, "last_used_at": t}),
                {name: f.model_copy(update={"received": received, "writer": None, "writer_until": None})})

    rec, files, changed = store.transact(dataset_id, fn, [name])
    return files.get(name) if changed else None


def _write_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def receive_chunk(request: Request, store: DatasetStore, artifacts: ArtifactStore, settings: Settings,
                        owner: str, dataset_id: str, name: str) -> tuple[DatasetFile, str | None]:
    """Write one chunk of ``name``. Returns the file as recorded and, if the body was not the
    whole chunk, why (the bytes that did arrive are kept)."""
    start, length, total = parse_content_range(request.headers.get("content-range"),
                                               request.headers.get("content-length"))
    token = uuid.uuid4().hex
    f, n = await run_in_threadpool(_reserve, store, settings, owner, dataset_id, name, start, length, total, token)
    try:
        fd = os.open(artifacts.dataset_files(dataset_id) / name, os.O_WRONLY)  # never O_CREAT: made at creation
    except OSError:
        await run_in_threadpool(_release, store, dataset_id, name, token, start)
        raise HTTPException(404, f"no dataset with id {dataset_id!r}") from None
    written, renewed = 0, time.monotonic()
    buf = bytearray()
    too_long = lost = False
    problem = None

    async def flush() -> bool:
        nonlocal written, renewed
        if time.monotonic() - renewed > _RENEW_S:
            # Renewed before writing: whoever writes holds a lease with >= 20 s left.
            if not await run_in_threadpool(_renew, store, dataset_id, name, token):
                return False
            renewed = time.monotonic()
        await run_in_threadpool(_write_all, fd, bytes(buf), start + written)
        written += len(buf)
        buf.clear()
        return True

    try:
        # What a writer that died mid-chunk left past the recorded offset is not the client's.
        os.ftruncate(fd, start)
        try:
            async for piece in request.stream():
                if written + len(buf) + len(piece) > n:
                    too_long = True
                    break
                buf += piece
                if len(buf) >= _BLOCK and not await flush():
                    lost = True
                    break
        except ClientDisconnect:
            problem = "the client disconnected"
        if not (too_long or lost) and buf:
            lost = not await flush()
        if too_long:
            os.ftruncate(fd, start)  # a malformed chunk is refused whole
            written = 0
        elif problem is None and not lost and written < n:
            problem = f"the body ended after {written} of {n} bytes"
        await run_in_threadpool(os.fsync, fd)  # what is recorded as received is on disk
    finally:
        os.close(fd)
    rec = None if lost else await run_in_threadpool(_release, store, dataset_id, name, token, start + written)
    if rec is None:
        raise HTTPException(409, f"{name}: the upload stalled for more than {WRITE_LEASE_S:.0f} s and another "
                                 f"request took the file over; ask GET /datasets/{dataset_id} where it stands")
    if too_long:
        raise HTTPException(400, f"{name}: the body is longer than its Content-Range ({n} bytes); nothing kept",
                            headers={"Upload-Offset": str(rec.received)})
    return rec, problem


# ---------------------------------------------------------------------- completion and validation


def complete_dataset(store: DatasetStore, owner: str, dataset_id: str, token: str,
                     lease_s: float) -> tuple[DatasetRecord, bool]:
    """Freeze the uploads and mark the dataset ``validating`` (taking its check lease).

    Returns the record and whether a validation must start now (``False``: it was ready, or a
    live validation holds it). Raises 409 naming what is missing.
    """
    out: dict[str, Any] = {}

    def fn(rec: DatasetRecord, files: dict[str, DatasetFile]):
        if rec.owner != owner or rec.deleting:
            raise HTTPException(404, f"no dataset with id {dataset_id!r}")
        t = now()
        if rec.state == DatasetState.ready:
            return None
        if rec.state == DatasetState.invalid:
            raise HTTPException(409, f"dataset {dataset_id} is invalid: {rec.error}; delete it and upload again")
        if rec.state == DatasetState.validating and (rec.check_until or 0) > t:
            return None
        missing = sorted((f for f in files.values() if not f.complete), key=lambda f: f.name)
        if missing:
            parts = [f"{f.name}: {f.received} of {f.size if f.size is not None else '?'} bytes" for f in missing[:5]]
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise HTTPException(409, f"dataset {dataset_id} is not fully uploaded ({'; '.join(parts)}{more})")
        busy = [f.name for f in files.values() if f.writer is not None and (f.writer_until or 0) > t]
        if busy:
            raise HTTPException(409, f"{busy[0]}: a chunk is still being written")
        out["start"] = True
        return rec.model_copy(update={"state": DatasetState.validating, "check_holder": token,
                                      "check_until": t + lease_s, "completed_at": t, "updated_at": t,
                                      "last_used_at": t, "error": None, "error_status": None}), None

    rec, _, _ = store.transact(dataset_id, fn, None)
    if rec is None:
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    return rec, bool(out.get("start"))


class DatasetChecker:
    """Validates completed datasets on threads, at most ``max_dataset_checks`` at once, each in
    its own ``python -m service.dataset_check`` process. While it runs (or waits for its turn)
    the thread renews the dataset's check lease (``lease_ttl_s``, like a job's); an API process
    that dies takes its check process with it and lets the lease lapse, and
    ``POST /datasets/{id}/complete`` then starts the validation again."""

    def __init__(self, store: DatasetStore, artifacts: ArtifactStore, settings: Settings,
                 python: str = sys.executable):
        self.store, self.artifacts, self.settings, self.python = store, artifacts, settings, python
        self._slots = threading.BoundedSemaphore(settings.max_dataset_checks)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, dataset_id: str, token: str) -> None:
        t = threading.Thread(target=self._run, args=(dataset_id, token), name=f"check-{dataset_id[:10]}",
                             daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def close(self) -> None:
        """Stop: running checks are killed, their datasets stay ``validating`` until the lease
        lapses (then completing them again restarts the check)."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=15)

    # ------------------------------------------------------------------ one check

    def _renew(self, dataset_id: str, token: str) -> bool:
        def fn(rec: DatasetRecord) -> DatasetRecord | None:
            if rec.check_holder != token or rec.state != DatasetState.validating:
                return None
            return rec.model_copy(update={"check_until": now() + self.settings.lease_ttl_s})

        return self.store.update(dataset_id, fn)[1]

    def _finish(self, dataset_id: str, token: str, result: dict) -> None:
        def fn(rec: DatasetRecord) -> DatasetRecord | None:
            if rec.check_holder != token or rec.state != DatasetState.validating:
                return None
            t = now()
            common = {"check_holder": None, "check_until": None, "updated_at": t, "last_used_at": t}
            if result.get("ok"):
                return rec.model_copy(update={**common, "state": DatasetState.ready, "n_images": result["n_images"],
                                              "image_size": result.get("image_size"),
                                              "channels": result.get("channels")})
            return rec.model_copy(update={**common, "state": DatasetState.invalid, "error": result["error"],
                                          "error_status": result.get("status", 422)})

        rec, changed = self.store.update(dataset_id, fn)
        if changed and rec.state == DatasetState.ready:
            # Frozen: the jobs that name it read these files in place, so nothing may change them.
            for p in self.artifacts.dataset_files(dataset_id).iterdir():
                p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        log.info("dataset %s: %s", dataset_id, rec.state.value if rec else "gone")

    def _spec(self, rec: DatasetRecord, files: dict[str, DatasetFile]) -> dict:
        s, d = self.settings, self.artifacts.dataset_dir(rec.id)
        archives = rec.layout != "images" and not any(n.lower().endswith((".npy", ".npz")) for n in files)
        return {
            "files_dir": str(self.artifacts.dataset_files(rec.id)),
            "files": [{"name": f.name, "sha256": f.sha256} for f in sorted(files.values(), key=lambda f: f.name)],
            "layout": rec.layout,
            "input_name": rec.input_name,
            "names_out": str(d / "names.txt"),
            "formats": sorted(s.image_formats),
            "format_extensions": {k: list(v) for k, v in IMAGE_FORMAT_EXTENSIONS.items()},
            "members_by_name": archives,
            "memory_bytes": s.dataset_check_memory_bytes,
            "limits": {"max_images": s.max_images_per_job, "max_pixels": s.max_pixels_per_image,
                       "max_side": s.max_side_per_image, "max_archive_members": s.max_archive_members,
                       "max_total_bytes": s.max_uncompressed_bytes, "max_compression_ratio": s.max_compression_ratio,
                       "allowed_formats": sorted(f.upper() for f in s.image_formats)},
        }

    def _run(self, dataset_id: str, token: str) -> None:
        try:
            self._check(dataset_id, token)
        except Exception:
            log.exception("dataset %s: the check failed; completing it again retries", dataset_id)

    def _check(self, dataset_id: str, token: str) -> None:
        while not self._slots.acquire(timeout=self.settings.lease_ttl_s / 3):
            if self._stop.is_set() or not self._renew(dataset_id, token):
                return
        try:
            if self._stop.is_set() or not self._renew(dataset_id, token):
                return
            rec = self.store.get(dataset_id)
            if rec is None:
                return
            d = self.artifacts.dataset_dir(dataset_id)
            spec_path = d / "check.json"
            spec_path.write_text(json.dumps(self._spec(rec, self.store.files(dataset_id))))
            with open(d / "check.log", "ab") as logf:
                proc = subprocess.Popen([self.python, "-m", "service.dataset_check", str(spec_path), str(os.getpid())],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                        start_new_session=True, env=_CHECK_ENV)
            result = self._wait(proc, dataset_id, token)
            if result is not None:
                self._finish(dataset_id, token, result)
        finally:
            self._slots.release()

    def _wait(self, proc: subprocess.Popen, dataset_id: str, token: str) -> dict | None:
        limit = self.settings.dataset_check_timeout_s
        started = next_renew = time.monotonic()
        try:
            while True:
                try:
                    proc.wait(timeout=min(0.2, limit / 4))
                    break
                except subprocess.TimeoutExpired:
                    pass
                t = time.monotonic()
                if self._stop.is_set():
                    return None
                if t - started > limit:
                    return {"ok": False, "status": 413,
                            "error": f"validating it took longer than {limit:.0f} s (CONGEAL_DATASET_CHECK_TIMEOUT_S)"}
                if t >= next_renew:
                    next_renew = t + self.settings.lease_ttl_s / 3
                    try:
                        if not self._renew(dataset_id, token):
                            return None  # deleted, or another check took over
                    except Exception:
                        log.exception("dataset %s: could not renew the check lease", dataset_id)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = proc.stdout.read().decode(errors="replace").strip().splitlines()
        proc.stdout.close()
        try:
            return json.loads(out[-1])
        except (IndexError, ValueError):
            why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            return {"ok": False, "status": 422, "error": f"the files could not be read ({why})"}


# ---------------------------------------------------------------------- public view


def file_public(f: DatasetFile) -> DatasetFilePublic:
    return DatasetFilePublic(name=f.name, size=f.size, received=f.received, complete=f.complete, sha256=f.sha256)


def to_public(rec: DatasetRecord, request: Request, settings: Settings, files: dict[str, DatasetFile] | None = None,
              jobs=None) -> DatasetPublic:
    path = request.app.url_path_for
    links = DatasetLinks(self=path("get_dataset", dataset_id=rec.id),
                         delete=path("delete_dataset", dataset_id=rec.id))
    if rec.state == DatasetState.uploading:
        links.upload = path("upload_dataset_file", dataset_id=rec.id, name="{name}")
        links.complete = path("complete_dataset", dataset_id=rec.id)
    ttl = settings.dataset_ttl
    fl = None if files is None else [file_public(f) for f in sorted(files.values(), key=lambda f: f.name)]
    return DatasetPublic(
        id=rec.id, label=rec.label, state=rec.state.value, layout=rec.layout, n_files=rec.n_files,
        bytes_declared=rec.bytes_declared,
        bytes_received=None if files is None else sum(f.received for f in files.values()),
        files=fl, n_images=rec.n_images, image_size=rec.image_size, channels=rec.channels,
        error=rec.error, error_status=rec.error_status,
        created_at=ts(rec.created_at), updated_at=ts(rec.updated_at), completed_at=ts(rec.completed_at),
        expires_at=None if ttl is None else ts(max(rec.last_used_at, rec.updated_at) + ttl),
        jobs_in_flight=None if jobs is None else jobs_in_flight(rec, jobs),
        links=links,
    )
