"""Receiving uploads: multipart streamed straight into the artifact store, then validated.

The body is parsed as it arrives (``python_multipart``'s push parser), each
file part written to ``jobs/<id>/input/<name>`` chunk by chunk, and the byte
limit enforced while streaming, so neither a large collection nor a lying
``Content-Length`` is ever held in memory. Form fields are the only parts kept in
memory: an unknown one is refused as soon as its name arrives, and all of them
together are capped. Validation then decodes every image in a worker thread, in
bounded memory (``service.imagecheck``), at most a few uploads at once and fewer
per API key (:class:`UploadGate`); any problem becomes a 4xx whose message names
the file.
"""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from models.imageio import IMAGE_EXTENSIONS, InputError, LimitExceeded, LoadLimits, is_archive

from .contracts.settings import IMAGE_FORMAT_EXTENSIONS
from .imagecheck import DecodeBudget, check_archive, check_image, check_npy

__all__ = ["UploadError", "Upload", "UploadGate", "receive_upload", "inspect_upload", "check_upload", "FILE_FIELD",
           "FIELDS_MAX_BYTES", "input_error_status"]

FILE_FIELD = "files"
FIELDS_MAX_BYTES = 64 * 1024  # all form fields of one request together; the options need a few hundred
# Uploads checked at once by one API process: each holds a threadpool thread while it decodes,
# so this stays well below the pool's 40 threads that every other request needs too.
_CHECKS_AT_ONCE = 4


class UploadError(Exception):
    """A request problem found while receiving or checking an upload."""

    def __init__(self, status: int, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # names as saved in the destination folder
    total_bytes: int = 0


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _safe_name(raw: str, image_exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> str:
    """The base name of an uploaded file, or an error saying why it cannot be used."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        raise UploadError(422, "a file part has an empty file name")
    if name.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in name) or len(name.encode()) > 255:
        raise UploadError(422, f"{raw!r}: file names must be visible (no leading '.'), printable and "
                               f"at most 255 bytes")
    low = name.lower()
    if not (low.endswith(image_exts) or is_archive(low) or low.endswith(".npy")):
        accepted = ", ".join(e.lstrip(".") for e in image_exts)
        raise UploadError(422, f"{name}: not an accepted image or an archive (accepted: {accepted}, "
                               f"one .zip/.tar[.gz] archive, or one .npy array)")
    return name


class _Receiver:
    """Callbacks for the push parser: routes each part to a file or a field."""

    def __init__(self, dest: Path, max_bytes: int, max_files: int, image_exts: tuple[str, ...] = IMAGE_EXTENSIONS,
                 fields: frozenset[str] | None = None):
        self.dest, self.max_bytes, self.max_files, self.image_exts = dest, max_bytes, max_files, image_exts
        self.fields = fields  # the form fields this request may carry; None: any
        self.field_bytes = 0
        self.up = Upload()
        self.ended = False
        self._hname = self._hval = b""
        self._headers: dict[str, bytes] = {}
        self._file = None
        self._field: str | None = None
        self._buf = bytearray()
        self.parser: MultipartParser | None = None

    # --- parser callbacks (names fixed by python_multipart)
    def on_part_begin(self):
        self._headers, self._hname, self._hval = {}, b"", b""
        self._file, self._field, self._buf = None, None, bytearray()

    def on_header_field(self, data, start, end):
        self._hname += data[start:end]

    def on_header_value(self, data, start, end):
        self._hval += data[start:end]

    def on_header_end(self):
        self._headers[self._hname.decode("latin-1").lower()] = self._hval
        self._hname = self._hval = b""

    def on_headers_finished(self):
        disp, opts = parse_options_header(self._headers.get("content-disposition", b"").decode("latin-1"))
        if disp != b"form-data" or b"name" not in opts:
            raise UploadError(400, "malformed multipart body: a part has no 'Content-Disposition: form-data; name=...'")
        name = _text(opts[b"name"])
        if b"filename" in opts:
            if name != FILE_FIELD:
                raise UploadError(422, [{"loc": ["body", name], "type": "unknown_file_field",
                                         "msg": f"unknown file field {name!r}; send images as '{FILE_FIELD}'"}])
            fname = _safe_name(_text(opts[b"filename"]), self.image_exts)
            if len(self.up.files) >= self.max_files:
                raise UploadError(413, f"more than {self.max_files} files in one upload")
            try:
                self._file = open(self.dest / fname, "xb")
            except FileExistsError:
                raise UploadError(422, f"{fname}: uploaded twice; file names must be unique") from None
            self.up.files.append(fname)
        else:
            if self.fields is not None and name not in self.fields:
                # Refused on its name, before its value is read: nothing unknown is ever buffered.
                why = (f"part {name!r} has no file name" if name == FILE_FIELD else
                       f"unknown field {name!r}; accepted: {', '.join(sorted(self.fields)) or 'none'}")
                raise UploadError(422, [{"loc": ["body", name], "type": "extra_forbidden", "msg": why}])
            self._field = name
            if name in self.up.fields:
                raise UploadError(422, [{"loc": ["body", name], "type": "duplicate_field",
                                         "msg": f"field {name!r} given twice"}])

    def on_part_data(self, data, start, end):
        n = end - start
        self.up.total_bytes += n
        if self.up.total_bytes > self.max_bytes:
            raise UploadError(413, f"upload is larger than the limit of {self.max_bytes} bytes")
        if self._file is not None:
            self._file.write(data[start:end])
        else:
            self._buf += data[start:end]
            self.field_bytes += n
            if self.field_bytes > FIELDS_MAX_BYTES:
                raise UploadError(413, f"form fields are longer than {FIELDS_MAX_BYTES} bytes in all "
                                       f"(reading field {self._field!r})")

    def on_part_end(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._field is not None:
            self.up.fields[self._field] = _text(bytes(self._buf))

    def on_end(self):
        self.ended = True

    def callbacks(self) -> dict:
        return {k: getattr(self, k) for k in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end", "on_end")}

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_upload(request: Request, dest: Path, *, max_bytes: int, max_files: int,
                         image_exts: tuple[str, ...] = IMAGE_EXTENSIONS,
                         fields: frozenset[str] | None = None) -> Upload:
    """Stream a ``multipart/form-data`` body into ``dest``. Raises :class:`UploadError`.

    ``fields``: the names of the form fields allowed beside the files (``None``: any).
    The caller removes ``dest`` on error.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, f"send multipart/form-data: images (or one archive) as '{FILE_FIELD}' "
                               f"parts and the options as form fields")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 64 * 1024:  # + room for part headers
        raise UploadError(413, f"upload is larger than the limit of {max_bytes} bytes")
    dest.mkdir(parents=True, exist_ok=True)
    rx = _Receiver(dest, max_bytes, max_files, image_exts, fields)
    rx.parser = MultipartParser(params[b"boundary"], rx.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                # File writes off the event loop: the artifact store may be a network volume.
                await run_in_threadpool(rx.feed, chunk)
        rx.parser.finalize()
    except MultipartParseError as e:
        raise UploadError(400, f"malformed multipart body ({e})") from None
    except ClientDisconnect:
        raise UploadError(400, "the client disconnected before the upload finished") from None
    finally:
        rx.close()
    if not rx.ended:
        raise UploadError(400, "malformed multipart body: it ends before its closing boundary")
    return rx.up


def input_error_status(e: InputError) -> int:
    """413 for inputs refused by a limit (pixels, bytes, counts, bombs), else 422."""
    return 413 if isinstance(e, LimitExceeded) else 422


def inspect_upload(dest: Path, files: list[str], limits: LoadLimits, min_images: int,
                   formats: frozenset[str] | None = None, budget: DecodeBudget | None = None
                   ) -> tuple[list[str], str | None]:
    """Check that every uploaded image decodes (in a worker thread: this is CPU work), in
    bounded memory: see ``service.imagecheck``; ``budget`` is the process's shared one.

    Returns the collection's image names and, when the upload was a single
    archive or array, its file name. Raises :class:`UploadError` naming the
    first bad file.
    """
    if not files:
        raise UploadError(422, f"no files: attach the images (or one .zip/.tar archive) as '{FILE_FIELD}' parts")
    budget = budget or DecodeBudget(256 * 1024**2)
    bundles = [f for f in files if is_archive(f) or f.lower().endswith(".npy")]
    try:
        if bundles:
            if len(files) > 1:
                raise UploadError(422, f"send either image files or one archive, not both "
                                       f"({bundles[0]} and {len(files) - 1} other file(s))")
            archive = bundles[0]
            if archive.lower().endswith(".npy"):
                names = check_npy(dest / archive, limits)
            else:
                # Members are checked one at a time and dropped: memory stays flat however large the archive.
                names = check_archive(dest / archive, limits, budget)
                if formats is not None:
                    # By content too (check_image), but a member's name must also announce an allowed format.
                    exts = tuple(e for f in formats for e in IMAGE_FORMAT_EXTENSIONS[f])
                    bad = [n for n in names if not n.lower().endswith(exts)]
                    if bad:
                        raise UploadError(422, f"{archive}: member {bad[0]!r} is not an accepted format "
                                               f"({', '.join(sorted(formats))})")
        else:
            if len(files) > limits.max_images:
                raise UploadError(413, f"{len(files)} images, above the limit of {limits.max_images} per job")
            for f in files:
                p = dest / f
                if os.path.getsize(p) > limits.max_file_bytes:
                    raise LimitExceeded(f"{f}: file is above the per-file limit of {limits.max_file_bytes} bytes")
                fmt = check_image(p, f, limits, budget).lower()  # by content: a renamed file does not get through
                if formats is not None and fmt not in formats:
                    raise UploadError(422, f"{f}: format {fmt.upper() or 'unknown'} is not accepted here "
                                           f"(accepted: {', '.join(sorted(formats))})")
            names, archive = list(files), None
    except InputError as e:
        raise UploadError(input_error_status(e), str(e)) from None
    if len(names) < min_images:
        raise UploadError(422, f"{len(names)} image(s): this needs at least {min_images}")
    return names, archive


class UploadGate:
    """How many uploads one API process checks at once: ``_CHECKS_AT_ONCE`` in all and
    ``per_key`` per API key (the others wait their turn, holding no thread), and the budget
    of decoded bytes all checks share (``service.imagecheck.DecodeBudget``)."""

    def __init__(self, memory_bytes: int, per_key: int):
        self.budget = DecodeBudget(memory_bytes)
        self.per_key = per_key
        self._all: asyncio.Semaphore | None = None
        self._keys: dict[str, asyncio.Semaphore] = {}  # one per tenant: a fixed, configured set

    @asynccontextmanager
    async def turn(self, owner: str):
        if self._all is None:
            self._all = asyncio.Semaphore(_CHECKS_AT_ONCE)
        mine = self._keys.setdefault(owner, asyncio.Semaphore(self.per_key))
        async with mine, self._all:
            yield


async def check_upload(dest: Path, files: list[str], limits: LoadLimits, min_images: int,
                       formats: frozenset[str] | None = None, gate: UploadGate | None = None,
                       owner: str = "anonymous"):
    if gate is None:
        return await run_in_threadpool(inspect_upload, dest, files, limits, min_images, formats)
    async with gate.turn(owner):
        return await run_in_threadpool(inspect_upload, dest, files, limits, min_images, formats, gate.budget)
