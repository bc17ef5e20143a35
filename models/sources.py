"""Image collections as sources a job reads in index order, in bounded memory.

NumPy and Pillow only, no torch: the service validates uploads with this module too.

* :class:`CollectionSource`: a folder of image files, one archive or one image, decoded into
  memory by :func:`models.imageio.load_collection` (bounded by the archive-member limits).
* :class:`ArraySource`: one ``.npy`` array, or a folder of ``.npy`` / ``.npz`` shards. A ``.npy``
  is read by file offset, a chunk at a time (never memory-mapped whole, never loaded whole);
  an ``.npz`` member one at a time. Arrays are ``(N, H, W)``, ``(N, H, W, 1|3)`` or
  ``(N, 1|3, H, W)``, ``uint8`` (0-255) or float (0-1, or 0-255 when any value is above 1).
* :class:`ArchiveShardsSource`: a folder of ``.zip`` / ``.tar[.gz...]`` shards, decoded one shard
  at a time, in sorted order.

Names: a single array's images are ``000000.png`` ...; a shard's are ``<shard stem>/<index or
member name>``, so names stay unique across shards. Host memory while reading is bounded by one
chunk (arrays) or one shard (archives), whatever the collection's size:
``tests/core/test_sources.py`` measures it.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .imageio import (Collection, InputError, LimitExceeded, LoadLimits, _check_count, _iter_decoded, is_archive,
                      load_collection)

__all__ = ["Source", "CollectionSource", "ArraySource", "ArchiveShardsSource", "open_source", "ARRAY_EXTENSIONS"]

ARRAY_EXTENSIONS = (".npy", ".npz")


class Source:
    """What a job reads: ``n`` images, ``channels`` (3 if any is colour, else 1), their names and
    sizes, and the images in index order, a chunk at a time."""

    n: int
    channels: int

    def __len__(self) -> int:
        return self.n

    def names(self, start: int = 0, stop: int | None = None) -> list[str]:
        raise NotImplementedError

    def sizes(self) -> np.ndarray:
        """``(N, 2)`` int64: each image's ``(H, W)``."""
        raise NotImplementedError

    def chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        """``(first index, images)`` for consecutive chunks of ``size``; images ``uint8``, ``(H, W)``
        or ``(H, W, 3)``."""
        raise NotImplementedError

    @property
    def uniform_size(self) -> tuple[int, int] | None:
        """``(H, W)`` when every image has it (arrays), else None."""
        return None


class CollectionSource(Source):
    """A decoded, in-memory :class:`models.imageio.Collection`."""

    def __init__(self, col: Collection):
        self.col = col
        self.n = len(col)
        self.channels = col.channels

    def names(self, start: int = 0, stop: int | None = None) -> list[str]:
        return self.col.names[start:stop]

    def sizes(self) -> np.ndarray:
        return np.array(self.col.sizes, dtype=np.int64).reshape(-1, 2)

    def chunks(self, size, start=0, stop=None):
        stop = self.n if stop is None else stop
        for k in range(start, stop, size):
            yield k, self.col.images[k:min(k + size, stop)]


# --------------------------------------------------------------------------- arrays


@dataclass
class _Shard:
    """One array: where it is, how its images are laid out, and how its values become uint8."""

    path: Path
    member: str | None  # .npz member name; None for a .npy
    n: int
    hw: tuple[int, int]
    channels: int
    layout: str  # "nhw", "nhwc", "nchw"
    dtype: np.dtype
    offset: int  # .npy data offset in the file
    scale: float  # floats: x * scale (255 for 0-1 data, 1 for 0-255 data)
    stem: str | None  # name prefix; None: a single array


def _shape(path: Path, shape: tuple, dtype: np.dtype, limits: LoadLimits) -> tuple[int, tuple[int, int], int, str]:
    name = path.name
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == bool):
        raise InputError(f"{name}: dtype {dtype} is not numeric")
    if len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3):
        n, c, h, w = shape
        layout = "nchw"
    elif len(shape) == 4 and shape[-1] in (1, 3):
        n, h, w, c = shape
        layout = "nhwc"
    elif len(shape) == 3:
        (n, h, w), c, layout = shape, 1, "nhw"
    else:
        raise LimitExceeded(f"{name}: array shape {shape} is not (N, H, W), (N, H, W, 1|3) or (N, 1|3, H, W)")
    if h * w > limits.max_pixels or max(h, w) > limits.max_side:
        raise LimitExceeded(f"{name}: images of {w}x{h} pixels are above the limit")
    if h < 1 or w < 1:
        raise LimitExceeded(f"{name}: images have no pixels ({w}x{h})")
    return int(n), (int(h), int(w)), int(c), layout


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # 3.0: the same reader, not exported


def _npy_shard(path: Path, limits: LoadLimits, stem: str | None) -> _Shard:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            f.seek(0)
            if head[:2] == b"PK":  # a zip container: np.load would hand back an NpzFile
                raise InputError(f"{path.name}: this is an .npz archive, not an .npy array; name it .npz")
            shape, fortran, dtype = _read_header(f)
            offset = f.tell()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path.name}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise InputError(f"{path.name}: not a plain numeric .npy array (it holds Python objects)")
    if fortran:
        raise InputError(f"{path.name}: Fortran-ordered arrays are not accepted; save it with np.save (C order)")
    n, hw, c, layout = _shape(path, shape, dtype, limits)
    need = offset + n * int(np.prod(shape[1:])) * dtype.itemsize
    if os.path.getsize(path) < need:
        raise InputError(f"{path.name}: the file is shorter than its header says ({os.path.getsize(path)} < {need} bytes)")
    return _Shard(path, None, n, hw, c, layout, dtype, offset, 1.0, stem)


def _npz_shards(path: Path, limits: LoadLimits) -> list[_Shard]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path.name}: not a readable .npz archive ({e})") from None
    out = []
    with zf:
        members = sorted((i for i in zf.infolist() if i.filename.endswith(".npy")), key=lambda i: i.filename)
        if not members:
            raise InputError(f"{path.name}: no arrays in this .npz")
        for info in members:
            if info.file_size > limits.max_file_bytes:
                raise LimitExceeded(f"{path.name}: member {info.filename!r} is {info.file_size} bytes, above the "
                                    f"per-file limit of {limits.max_file_bytes}")
            if info.file_size > 1024**2 and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
                raise LimitExceeded(f"{path.name}: member {info.filename!r} expands "
                                    f"{info.file_size / max(info.compress_size, 1):.0f}x; refusing a possible zip bomb")
            try:
                with zf.open(info) as fh:
                    shape, fortran, dtype = _read_header(fh)
            except Exception as e:
                raise InputError(f"{path.name}: member {info.filename!r} is not a readable array ({e})") from None
            if dtype.hasobject:
                raise InputError(f"{path.name}: member {info.filename!r} holds Python objects")
            key = info.filename[:-4]
            n, hw, c, layout = _shape(Path(f"{path.name}:{key}"), shape, dtype, limits)
            out.append(_Shard(path, key, n, hw, c, layout, dtype, 0, 1.0, None))
    multi = len(out) > 1
    for s in out:
        s.stem = f"{path.stem}/{s.member}" if multi else path.stem
    return out


class ArraySource(Source):
    """Images stored in one or more arrays, read a chunk at a time (see the module docstring)."""

    def __init__(self, shards: list[_Shard], limits: LoadLimits, label: str):
        sizes = {s.hw for s in shards}
        if len(sizes) > 1:
            raise InputError(f"{label}: the arrays hold images of different sizes ({sorted(sizes)}); "
                             "shards must share one image size")
        self.shards = shards
        self.n = sum(s.n for s in shards)
        if self.n > limits.max_images:
            raise LimitExceeded(f"{label}: {self.n} images, above the limit of {limits.max_images}")
        self.channels = 3 if any(s.channels == 3 for s in shards) else 1
        self._starts = np.cumsum([0] + [s.n for s in shards])
        self._hw = shards[0].hw if shards else (0, 0)
        self._cache: tuple[int, np.ndarray] | None = None  # one decoded .npz member
        for s in shards:
            self._check_values(s, label)

    @property
    def uniform_size(self):
        return self._hw

    def sizes(self) -> np.ndarray:
        return np.tile(np.array(self._hw, dtype=np.int64), (self.n, 1))

    def names(self, start=0, stop=None):
        stop = self.n if stop is None else stop
        out = []
        for i, s in enumerate(self.shards):
            a, b = max(start, self._starts[i]), min(stop, self._starts[i + 1])
            if a >= b:
                continue
            w = max(6, len(str(s.n - 1)))
            base = self._starts[i]
            prefix = "" if s.stem is None else s.stem + "/"
            out += [f"{prefix}{j - base:0{w}d}.png" for j in range(a, b)]
        return out

    def _raw(self, i: int, a: int, b: int) -> np.ndarray:
        """Shard ``i``'s images ``a:b`` (shard-local), as stored."""
        s = self.shards[i]
        per = s.hw[0] * s.hw[1] * s.channels
        if s.member is None:
            with open(s.path, "rb") as f:
                f.seek(s.offset + a * per * s.dtype.itemsize)
                flat = np.fromfile(f, dtype=s.dtype, count=(b - a) * per)
            shape = {"nhw": (b - a, *s.hw), "nhwc": (b - a, *s.hw, s.channels),
                     "nchw": (b - a, s.channels, *s.hw)}[s.layout]
            return flat.reshape(shape)
        if self._cache is None or self._cache[0] != i:
            with np.load(s.path, allow_pickle=False) as z:
                self._cache = (i, np.asarray(z[s.member]))
        return self._cache[1][a:b]

    @staticmethod
    def _uint8(s: _Shard, a: np.ndarray) -> np.ndarray:
        if a.ndim == 4 and s.layout == "nchw":
            a = np.moveaxis(a, 1, -1)
        if a.ndim == 4 and a.shape[-1] == 1:
            a = a[..., 0]
        if np.issubdtype(a.dtype, np.floating):
            return np.clip(a * s.scale + 0.5, 0, 255).astype(np.uint8)
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        return np.clip(a, 0, 255).astype(np.uint8)

    def _check_values(self, s: _Shard, label: str, chunk: int = 65536) -> None:
        """Floats: every value finite; 0-1 data is scaled to 0-255 (the whole shard decides, as a
        single array always did). One pass, a chunk at a time."""
        if not np.issubdtype(s.dtype, np.floating):
            return
        i = self.shards.index(s)
        hi = 0.0
        for a in range(0, s.n, chunk):
            x = self._raw(i, a, min(s.n, a + chunk))
            if not np.isfinite(x).all():
                raise InputError(f"{s.path.name}{'' if s.member is None else ':' + s.member}: array holds NaN or "
                                 "infinite values")
            hi = max(hi, float(x.max(initial=0.0)))
        s.scale = 255.0 if hi <= 1.0 else 1.0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` as one uint8 array ``(k, H, W)`` or ``(k, H, W, 3)`` (grey shards
        are repeated to 3 channels when another shard is colour)."""
        parts = []
        for i, s in enumerate(self.shards):
            a, b = max(start, self._starts[i]), min(stop, self._starts[i + 1])
            if a < b:
                u = self._uint8(s, self._raw(i, a - self._starts[i], b - self._starts[i]))
                if self.channels == 3 and u.ndim == 3:
                    u = np.repeat(u[..., None], 3, axis=-1)
                parts.append(u)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def chunks(self, size, start=0, stop=None):
        stop = self.n if stop is None else stop
        for k in range(start, stop, size):
            yield k, self.read(k, min(k + size, stop))


# --------------------------------------------------------------------------- archive shards


class ArchiveShardsSource(Source):
    """A folder of archives, each decoded when its images are read (one shard in memory)."""

    def __init__(self, paths: list[Path], limits: LoadLimits, label: str):
        self.paths, self.limits = paths, limits
        self._names: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        counts = []
        colour = False
        for p in paths:  # one validating pass: every member decoded once, then dropped
            k = 0
            for name, im in _iter_decoded(p, limits, []):
                self._names.append(f"{_stem(p)}/{name}")
                self._sizes.append(im.shape[:2])
                colour = colour or im.ndim == 3
                k += 1
                if len(self._names) > limits.max_images:
                    raise LimitExceeded(f"{label}: more than {limits.max_images} images")
            counts.append(k)
        self.n = len(self._names)
        self.channels = 3 if colour else 1
        self._starts = np.cumsum([0] + counts)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def names(self, start=0, stop=None):
        return self._names[start:stop]

    def sizes(self):
        return np.array(self._sizes, dtype=np.int64).reshape(-1, 2)

    def _shard(self, i: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, [im for _, im in _iter_decoded(self.paths[i], self.limits, [])])
        return self._cache[1]

    def chunks(self, size, start=0, stop=None):
        stop = self.n if stop is None else stop
        for k in range(start, stop, size):
            out, pos, end = [], k, min(k + size, stop)
            while pos < end:
                i = int(np.searchsorted(self._starts, pos, side="right") - 1)
                b = min(end, self._starts[i + 1])
                out += self._shard(i)[pos - self._starts[i]:b - self._starts[i]]
                pos = b
            yield k, out


def _stem(p: Path) -> str:
    name = p.name
    for ext in sorted((".npy", ".npz", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"),
                      key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def _shard_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The folder's array files and archives (recursive, sorted, hidden files skipped), when it
    holds shards rather than image files."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_EXTENSIONS]
    archives = [p for p in files if is_archive(p.name)]
    return arrays, archives


def open_source(source: str | os.PathLike, limits: LoadLimits = LoadLimits()) -> Source:
    """Open any accepted input (see the module docstring) as a :class:`Source`, validated.

    Raises:
        InputError / LimitExceeded: naming the file and the problem.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() in ARRAY_EXTENSIONS:
        shards = [_npy_shard(path, limits, None)] if path.suffix.lower() == ".npy" else _npz_shards(path, limits)
        if path.suffix.lower() == ".npz" and len(shards) == 1:
            shards[0].stem = None
        src: Source = ArraySource(shards, limits, path.name)
    elif path.is_dir():
        arrays, archives = _shard_files(path)
        if arrays or archives:
            others = [p for p in path.rglob("*") if p.is_file() and p not in arrays and p not in archives
                      and not p.name.startswith(".")]
            images = [p for p in others if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")]
            if images or (arrays and archives):
                raise InputError(f"{path.name}: mixes {'arrays' if arrays else 'archives'} with "
                                 f"{'image files' if images else 'archives'}; a folder holds image files, or "
                                 ".npy/.npz shards, or .zip/.tar shards")
        if arrays:
            shards = []
            for p in arrays:
                rel = p.relative_to(path).as_posix()
                if p.suffix.lower() == ".npy":
                    shards.append(_npy_shard(p, limits, _stem_rel(rel)))
                else:
                    sub = _npz_shards(p, limits)
                    for s in sub:
                        s.stem = _stem_rel(rel) + ("" if len(sub) == 1 else "/" + s.member)
                    shards += sub
            src = ArraySource(shards, limits, path.name)
        elif archives:
            src = ArchiveShardsSource(archives, limits, path.name)
        else:
            src = CollectionSource(load_collection(path, limits))
    else:
        src = CollectionSource(load_collection(path, limits))
    _check_count(path, src.n, limits)
    return src


def _stem_rel(rel: str) -> str:
    head, _, tail = rel.rpartition("/")
    return (head + "/" if head else "") + _stem(Path(tail))

