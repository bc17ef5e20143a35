"""Reading image collections safely. NumPy and Pillow only: no torch here.

The service validates uploads with this module, so it must stay torch-free
(``tests/test_imports.py`` checks it).

Inputs accepted by :func:`load_collection`:

* a folder (searched recursively) of PNG / JPEG / TIFF / BMP files,
* a ``.zip`` or ``.tar`` (optionally ``.gz`` / ``.bz2`` / ``.xz``) of them,
* a ``.npy`` array ``(N, H, W)``, ``(N, H, W, 1|3)`` or ``(N, 1|3, H, W)``,
  ``uint8`` (0-255) or float (0-1),
* a single image file (useful for ``apply``).

Files whose extension is not an image extension are skipped, as are hidden
files and ``__MACOSX`` folders; a file *with* an image extension that does
not decode is an error naming the file. Names are the path relative to the
folder or archive root, with ``/`` separators, and are kept in every output.

Hostile input is refused before it costs memory: image headers are checked
against a pixel limit before decoding (decompression bombs), archive members
against count, size and compression-ratio limits (zip bombs), and archive
paths must be relative, without ``..``, and not links.
"""
from __future__ import annotations

import io
import os
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

__all__ = [
    "InputError",
    "LimitExceeded",
    "LoadLimits",
    "Collection",
    "IMAGE_EXTENSIONS",
    "ARCHIVE_EXTENSIONS",
    "open_image",
    "decode_image",
    "load_collection",
    "scan_collection",
    "working_size",
    "resize_to",
    "save_png",
    "is_archive",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_PIL_FORMATS = {"PNG", "JPEG", "TIFF", "BMP", "MPO"}  # MPO: multi-picture JPEG from phones


class InputError(ValueError):
    """The input cannot be used; the message names the file and the problem."""


class LimitExceeded(InputError):
    """The input is over a configured limit (size, pixels, count, ratio): HTTP 413."""


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on what a collection may cost to read. All are configurable."""

    max_images: int = 100_000_000  # a job's images; the real bound is memory and disk
    min_images: int = 1
    max_pixels: int = 40_000_000  # per image, checked from the header
    max_side: int = 16_384
    max_archive_members: int = 250_000
    max_total_bytes: int = 4 * 1024**3  # uncompressed, whole archive
    max_compression_ratio: float = 200.0  # per member, for members above 1 MiB
    max_file_bytes: int = 256 * 1024**2
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP")  # checked by content, not name


@dataclass
class Collection:
    """Decoded images and their names.

    ``images[i]`` is ``uint8``, ``(H, W)`` for grayscale or ``(H, W, 3)`` for RGB.
    """

    names: list[str]
    images: list[np.ndarray]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def channels(self) -> int:
        """3 if any image is colour, else 1."""
        return 3 if any(im.ndim == 3 for im in self.images) else 1

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [im.shape[:2] for im in self.images]

    def select(self, idx) -> "Collection":
        return Collection([self.names[i] for i in idx], [self.images[i] for i in idx])


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_EXTENSIONS)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _skip_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Pillow image -> ``uint8`` ``(H, W)`` or ``(H, W, 3)``; alpha over black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = a / (65535.0 if hi > 255 else 255.0) * 255.0
        return np.clip(a + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return np.clip(a + 0.5, 0, 255).astype(np.uint8)
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if im.mode in ("LA", "RGBA", "PA", "P") or "A" in im.getbands():
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        if im.mode in ("LA",):
            return out[..., 0]
        return _collapse_gray(out)
    return _collapse_gray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB image whose channels are equal is stored as grayscale."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def open_image(f, name: str, limits: LoadLimits = LoadLimits()) -> Image.Image:
    """Open one image (a binary file object or path) and check its header: an accepted format
    by content, and pixels within the limits. Nothing is decoded yet. Call it where
    ``Image.DecompressionBombWarning`` is an error (``decode_image`` does).

    Raises:
        InputError / LimitExceeded: naming ``name`` and what is wrong.
    """
    try:
        im = Image.open(f)
    except Image.DecompressionBombError as e:
        raise LimitExceeded(f"{name}: image too large to decode safely ({e})") from None
    except Exception:
        raise InputError(f"{name}: not a readable image (unknown or corrupt format)") from None
    fmt = "JPEG" if im.format == "MPO" else im.format
    allowed = [f.upper() for f in limits.allowed_formats]
    if im.format not in _PIL_FORMATS or fmt not in allowed:
        im.close()
        raise InputError(f"{name}: format {im.format} is not accepted; use {', '.join(allowed)}")
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise LimitExceeded(f"{name}: image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels or max(w, h) > limits.max_side:
        im.close()
        raise LimitExceeded(
            f"{name}: {w}x{h} pixels is above the limit "
            f"({limits.max_pixels} pixels, {limits.max_side} per side); refusing to decode"
        )
    return im


def decode_image(data: bytes, name: str, limits: LoadLimits = LoadLimits()) -> np.ndarray:
    """Decode one image, refusing bombs before any pixel is decoded.

    Raises:
        InputError: naming ``name`` and what is wrong.
    """
    if len(data) == 0:
        raise LimitExceeded(f"{name}: empty file")
    if len(data) > limits.max_file_bytes:
        raise LimitExceeded(f"{name}: file is {len(data)} bytes, above the limit of {limits.max_file_bytes}")
    with warnings.catch_warnings():
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we want
        # an error, and our own, lower limit checked from the header below.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = open_image(io.BytesIO(data), name, limits)
        try:
            im.load()
            arr = _to_uint8(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise LimitExceeded(f"{name}: image too large to decode safely ({e})") from None
        except Exception as e:
            raise InputError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    return arr


def _check_member_path(name: str, archive: str, seen: dict[str, str] | None = None) -> str:
    """The member's name as the collection will know it (``/`` separators, normalised).

    With ``seen`` (normalised name -> name as stored), a second member that normalises to a
    name already seen is refused: both would land on one output file, and one would be lost
    (``a/b.png`` and ``a\\b.png`` are one name here). The caller adds only the names it keeps.
    """
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    if ".." in p.parts:
        raise InputError(f"{archive}: member {name!r} escapes the archive root ('..'); refusing the archive")
    key = str(p)
    if seen is not None and key in seen:
        same = "" if seen[key] == name else f" (as {seen[key]!r})"
        raise InputError(f"{archive}: member {name!r} appears twice{same}; image names must be unique, "
                         f"refusing the archive")
    return key


def _iter_zip(path: Path, limits: LoadLimits) -> Iterator[tuple[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path.name}: not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise LimitExceeded(f"{path.name}: {len(infos)} members, above the limit of {limits.max_archive_members}")
        total = 0
        seen: dict[str, str] = {}
        for info in infos:
            name = _check_member_path(info.filename, path.name)
            if info.is_dir():
                continue
            # Unix symlinks in a zip carry S_IFLNK in the high bits of external_attr.
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise LimitExceeded(f"{path.name}: member {name!r} is a symbolic link; links are not accepted")
            total += info.file_size
            if total > limits.max_total_bytes:
                raise LimitExceeded(f"{path.name}: uncompressed size above the limit of {limits.max_total_bytes} bytes")
            if info.file_size > 1024**2 and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
                raise LimitExceeded(
                    f"{path.name}: member {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                    f"(limit {limits.max_compression_ratio:.0f}x); refusing a possible zip bomb"
                )
            if _skip_name(name) or not _is_image_name(name):
                yield name, b""  # skipped marker
                continue
            _check_member_path(info.filename, path.name, seen)
            seen[name] = info.filename
            if info.file_size > limits.max_file_bytes:
                raise LimitExceeded(f"{name}: {info.file_size} bytes, above the per-file limit of {limits.max_file_bytes}")
            try:
                with zf.open(info) as fh:
                    # Read at most the declared size + 1: a lying header cannot make us read more.
                    data = fh.read(info.file_size + 1)
            except Exception as e:
                raise InputError(f"{path.name}: member {name!r} cannot be extracted ({e})") from None
            if len(data) > info.file_size:
                raise InputError(f"{path.name}: member {name!r} is larger than its header says; refusing the archive")
            yield name, data


def _iter_tar(path: Path, limits: LoadLimits) -> Iterator[tuple[str, bytes]]:
    import lzma  # a corrupt .tar.xz raises LZMAError, which is no OSError

    # The file is opened here so that its position tells how many compressed bytes the
    # decompressor has consumed: a .tar.gz/.bz2/.xz has no per-member compressed size to check
    # up front (a zip has), so the expansion ratio is checked while reading.
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path.name}: not a readable tar archive ({e})") from None
    try:
        tf = tarfile.open(fileobj=raw, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raw.close()
        raise InputError(f"{path.name}: not a readable tar archive ({e})") from None
    chunk = 1024**2

    def check_ratio(name: str, expanded: int, compressed: int) -> None:
        # As for zips, only above 1 MiB. Decompressors read ahead (gzip up to 128 KiB), so a
        # bomb is caught at most ratio x read-ahead bytes late (~26 MB at 200x), never later.
        if expanded > chunk and expanded > limits.max_compression_ratio * max(compressed, 1):
            raise LimitExceeded(
                f"{path.name}: member {name!r} expands more than {expanded / max(compressed, 1):.0f}x "
                f"(limit {limits.max_compression_ratio:.0f}x); refusing a possible compression bomb"
            )

    with raw, tf:
        count, total = 0, 0
        seen: dict[str, str] = {}
        prev, prev_end, prev_raw = None, 0, 0
        try:
            for m in tf:
                # Reaching this header decompressed what lay before it (the previous member's
                # data, skipped unread when it was not an image): its ratio counts too.
                if prev is not None:
                    check_ratio(prev, m.offset - prev_end, raw.tell() - prev_raw)
                prev, prev_end, prev_raw = m.name, m.offset, raw.tell()
                count += 1
                if count > limits.max_archive_members:
                    raise LimitExceeded(f"{path.name}: more than {limits.max_archive_members} members")
                name = _check_member_path(m.name, path.name)
                if m.issym() or m.islnk():
                    raise InputError(f"{path.name}: member {name!r} is a link; links are not accepted")
                if m.isdir():
                    continue
                if not m.isfile():
                    raise LimitExceeded(f"{path.name}: member {name!r} is not a regular file")
                total += m.size
                if total > limits.max_total_bytes:
                    raise LimitExceeded(f"{path.name}: uncompressed size above the limit of {limits.max_total_bytes} bytes")
                if _skip_name(name) or not _is_image_name(name):
                    yield name, b""
                    continue
                _check_member_path(m.name, path.name, seen)
                seen[name] = m.name
                if m.size > limits.max_file_bytes:
                    raise LimitExceeded(f"{name}: {m.size} bytes, above the per-file limit of {limits.max_file_bytes}")
                fh = tf.extractfile(m)
                parts, got, start = [], 0, raw.tell()
                while fh is not None and got < m.size:
                    part = fh.read(min(chunk, m.size - got))
                    if not part:
                        break
                    parts.append(part)
                    got += len(part)
                    check_ratio(name, got, raw.tell() - start)
                prev_end, prev_raw = m.offset_data + got, raw.tell()  # the part read is checked already
                yield name, b"".join(parts)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise InputError(f"{path.name}: corrupt tar archive ({e})") from None


def _iter_folder(root: Path, limits: LoadLimits) -> Iterator[tuple[str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    if len(files) > limits.max_archive_members:
        raise LimitExceeded(f"{root.name}: {len(files)} files, above the limit of {limits.max_archive_members}")
    seen: dict[str, str] = {}
    for p in files:
        name = p.relative_to(root).as_posix()
        if _skip_name(name) or not _is_image_name(name):
            yield name, b""
            continue
        key = name.replace("\\", "/")  # a backslash is a plain character in a Linux file name
        if key in seen:
            raise InputError(f"{root.name}: {name!r} and {seen[key]!r} are one name once '\\' reads as '/'; "
                             f"image names must be unique")
        seen[key] = name
        if p.is_symlink():
            raise LimitExceeded(f"{name}: symbolic links are not accepted")
        size = p.stat().st_size
        if size > limits.max_file_bytes:
            raise LimitExceeded(f"{name}: {size} bytes, above the per-file limit of {limits.max_file_bytes}")
        yield name, p.read_bytes()


def _from_npy(path: Path, limits: LoadLimits) -> Collection:
    """A ``.npy`` / ``.npz`` read whole into a :class:`Collection` (see :mod:`models.sources`)."""
    from .sources import open_source  # sources builds on this module

    src = open_source(path, limits)
    arr = src.read(0, src.n)
    return Collection(src.names(), [np.ascontiguousarray(x) for x in arr])


def _iter_decoded(path: Path, limits: LoadLimits, skipped: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Decode a folder/archive/image one file at a time, checking every limit first."""
    if path.is_dir():
        it = _iter_folder(path, limits)
    elif path.name.lower().endswith(".zip"):
        it = _iter_zip(path, limits)
    elif is_archive(path.name):
        it = _iter_tar(path, limits)
    elif _is_image_name(path.name):
        it = iter([(path.name, path.read_bytes())])
    else:
        raise InputError(
            f"{path.name}: not a folder, archive (.zip/.tar[.gz]), .npy or image "
            f"({'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"
        )
    count = 0
    for name, data in it:
        if not data and (_skip_name(name) or not _is_image_name(name)):
            skipped.append(name)
            continue
        count += 1
        if count > limits.max_images:
            raise LimitExceeded(f"{path.name}: more than {limits.max_images} images")
        yield name, decode_image(data, name, limits)


def _check_count(path: Path, n: int, limits: LoadLimits) -> None:
    if n == 0:
        raise InputError(f"{path.name}: no images found (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    if n < limits.min_images:
        raise InputError(f"{path.name}: {n} image(s); at least {limits.min_images} are needed")


def load_collection(source: str | os.PathLike, limits: LoadLimits = LoadLimits()) -> Collection:
    """Read a folder, archive, ``.npy`` or single image into a :class:`Collection`.

    Raises:
        InputError: if the input is missing, unreadable, empty, or holds a file
            with an image extension that does not decode.
        LimitExceeded: (a subclass) if it is over one of ``limits``.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        col = _from_npy(path, limits)
    else:
        skipped: list[str] = []
        pairs = list(_iter_decoded(path, limits, skipped))
        col = Collection([n for n, _ in pairs], [a for _, a in pairs], skipped)
    _check_count(path, len(col), limits)
    return col


def scan_collection(source: str | os.PathLike, limits: LoadLimits = LoadLimits()) -> list[tuple[str, tuple[int, ...]]]:
    """Validate like :func:`load_collection` (every image fully decoded, every array value
    checked) but keep only ``(name, shape)`` pairs: memory stays bounded by one image, one array
    chunk or one archive shard, however large the upload. Accepts everything
    :func:`models.sources.open_source` does (arrays and folders of shards too)."""
    from .sources import ArraySource, ArchiveShardsSource, _shard_files, open_source

    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    sharded = path.is_dir() and any(_shard_files(path))
    if (path.is_file() and path.suffix.lower() in (".npy", ".npz")) or sharded:
        src = open_source(path, limits)
        if isinstance(src, (ArraySource, ArchiveShardsSource)):
            shape = None if src.uniform_size is None else (*src.uniform_size, *((3,) if src.channels == 3 else ()))
            sizes = None if shape is not None else src.sizes()
            return [(n, shape if shape is not None else tuple(int(v) for v in sizes[i]))
                    for i, n in enumerate(src.names())]
    out = [(n, a.shape) for n, a in _iter_decoded(path, limits, [])]
    _check_count(path, len(out), limits)
    return out


def working_size(sizes: list[tuple[int, int]], max_side: int = 128) -> tuple[int, int]:
    """The working ``(H, W)`` for a collection.

    Rule: the median height and median width of the collection, scaled down
    (keeping that aspect ratio) so that the longer side is at most
    ``max_side``, and at least 8 pixels a side.
    """
    hs = sorted(s[0] for s in sizes)
    ws = sorted(s[1] for s in sizes)
    h, w = float(hs[len(hs) // 2]), float(ws[len(ws) // 2])
    scale = min(1.0, max_side / max(h, w))
    return max(8, int(round(h * scale))), max(8, int(round(w * scale)))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ``uint8`` image to ``(H, W)`` with antialiasing, as float32 in [0, 1]."""
    h, w = size
    if image.shape[:2] != (h, w):
        im = Image.fromarray(image)
        image = np.asarray(im.resize((w, h), Image.BILINEAR, reducing_gap=None))
    return image.astype(np.float32) / 255.0


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save a float [0, 1] or uint8 image, ``(H, W)`` or ``(H, W, 3)``, as PNG."""
    a = image
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")
