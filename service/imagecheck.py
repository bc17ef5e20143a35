"""Checking an upload's images in bounded memory: the API's side of validation.

``models.imageio.decode_image`` turns an image into the core's ``uint8`` layout by way of
float32 (alpha compositing), about 14 bytes a pixel at the peak: a 170 KB, 39.7-megapixel
RGBA PNG cost the API 2.2 GB. The API only has to know that every image decodes, so here
each image is decoded in the mode it is stored in (1, 2 or 4 bytes a pixel; JPEGs at 1/8
scale, which still reads the whole compressed stream), and only while it holds its share of
a process-wide :class:`DecodeBudget`: however many uploads are checked at once, their
decoded pixels never exceed the budget. A ``.npy`` array is checked from its header and one
chunked pass over its values, never loaded whole. The worker decodes with ``models.imageio``
as before; the checks and messages here mirror it (``tests/service/test_service_hardening.py``
holds both to the same verdicts).
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# Private on purpose: these iterate an archive's members with every safety check of the core
# (paths, links, sizes, ratios, duplicates). The core has no public per-member iterator yet.
from models.imageio import (IMAGE_EXTENSIONS, InputError, LimitExceeded, LoadLimits, _is_image_name, _iter_tar,
                            _iter_zip, _skip_name, open_image)

__all__ = ["DecodeBudget", "check_image", "check_archive", "check_npy", "npy_names"]

_NPY_MAGIC = b"\x93NUMPY"
_SCAN_BYTES = 16 * 1024**2  # one read of a .npy array's values


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_large_blocks_to_the_system() -> None:
    """Serve every allocation of 1 MiB or more (Pillow's image blocks) by its own mapping.

    glibc otherwise raises its mmap threshold after the first large free and then keeps freed
    image memory inside each thread's arena: four checks on four threads left the process
    ~150 MiB per thread larger than the budget it had ever lent. Not glibc: nothing to do.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1024**2)
    except (OSError, AttributeError):
        pass


class DecodeBudget:
    """Bytes of decoded pixels the process may hold at once, shared by every upload check.

    A reservation larger than the whole budget is cut to the budget: such an image is
    decoded alone instead of never.
    """

    def __init__(self, capacity: int):
        _return_large_blocks_to_the_system()
        self.capacity = int(capacity)
        self.used = 0
        self.peak = 0  # the most ever reserved at once (tests and the docs read it)
        self._cv = threading.Condition()

    @contextmanager
    def reserve(self, n: int):
        n = max(0, min(int(n), self.capacity))
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


def _stored_bytes_per_pixel(mode: str) -> int:
    """How much Pillow's own buffer takes per pixel in ``mode`` (multi-band modes are padded to 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def check_image(src: bytes | Path, name: str, limits: LoadLimits, budget: DecodeBudget) -> str:
    """Decode one image (bytes, or a file read lazily) as ``decode_image`` would refuse it,
    holding at most its stored size in memory. Returns its format (``PNG``, ``JPEG``, ...).

    Raises:
        InputError, LimitExceeded: naming ``name``, with ``decode_image``'s wording.
    """
    size = len(src) if isinstance(src, (bytes, bytearray)) else Path(src).stat().st_size
    if size == 0:
        raise LimitExceeded(f"{name}: empty file")
    if size > limits.max_file_bytes:
        raise LimitExceeded(f"{name}: file is {size} bytes, above the limit of {limits.max_file_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = open_image(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, name, limits)
        with im:
            fmt = "JPEG" if im.format == "MPO" else im.format
            w, h = im.size
            try:
                if fmt == "JPEG":
                    im.draft(im.mode, (math.ceil(w / 8), math.ceil(h / 8)))
                need = im.size[0] * im.size[1] * _stored_bytes_per_pixel(im.mode)
                with budget.reserve(need):
                    im.load()
                    # The core converts every mode to L, RGB or RGBA (or reads 16/32-bit ones
                    # as numbers): a mode it could not convert fails here, on a few pixels.
                    corner = im.crop((0, 0, min(w, 4), min(h, 4)))
                    if corner.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                        np.asarray(corner)
                    else:
                        corner.convert("RGBA" if "A" in corner.getbands() or corner.mode == "P" else "RGB")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise LimitExceeded(f"{name}: image too large to decode safely ({e})") from None
            except Exception as e:
                raise InputError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    return fmt


def check_archive(path: Path, limits: LoadLimits, budget: DecodeBudget) -> list[str]:
    """Every image of a ``.zip`` / ``.tar[.gz|.bz2|.xz]``, checked member by member (each
    member's bytes are dropped before the next is read). Returns the image names, in order."""
    it = _iter_zip(path, limits) if path.name.lower().endswith(".zip") else _iter_tar(path, limits)
    names: list[str] = []
    for name, data in it:
        if not data and (_skip_name(name) or not _is_image_name(name)):
            continue  # not an image: skipped, as the core skips it
        if len(names) >= limits.max_images:
            raise LimitExceeded(f"{path.name}: more than {limits.max_images} images")
        check_image(data, name, limits, budget)
        names.append(name)
    if not names:
        raise InputError(f"{path.name}: no images found (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    return names


def npy_names(n: int) -> list[str]:
    """The names ``models.imageio`` gives the images of an ``(N, ...)`` array."""
    width = max(6, len(str(n - 1)))
    return [f"{i:0{width}d}.png" for i in range(n)]


def check_npy(path: Path, limits: LoadLimits) -> list[str]:
    """A ``.npy`` array checked as ``models.imageio`` loads it, in constant memory: the
    signature and header, the shape and dtype rules, the data length, and (floats) one
    chunked pass for NaN and infinity. Returns the image names."""
    name = path.name
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            # np.load would hand back an NpzFile (a zip) or try to unpickle; neither is an array.
            raise InputError(f"{name}: not a .npy array (the file does not begin with the .npy signature; "
                             f"an .npz archive or another format?)")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except ValueError as e:
            raise InputError(f"{name}: not a plain numeric .npy array ({e})") from None
        data_at = f.tell()
        if dtype.hasobject:
            raise InputError(f"{name}: not a plain numeric .npy array (object arrays are never loaded)")
        nd = len(shape)
        view = tuple(shape)
        if nd == 4 and view[1] in (1, 3) and view[-1] not in (1, 3):
            view = (view[0], view[2], view[3], view[1])
        if nd == 4 and view[-1] == 1:
            view = view[:3]
        if not (len(view) == 3 or (len(view) == 4 and view[-1] == 3)):
            raise LimitExceeded(f"{name}: array shape {tuple(shape)} is not (N, H, W), (N, H, W, 1|3) or (N, 1|3, H, W)")
        if view[0] > limits.max_images:
            raise LimitExceeded(f"{name}: {view[0]} images, above the limit of {limits.max_images}")
        if view[1] * view[2] > limits.max_pixels:
            raise LimitExceeded(f"{name}: images of {view[2]}x{view[1]} pixels are above the limit")
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == bool):
            raise InputError(f"{name}: dtype {dtype} is not numeric")
        count = math.prod(shape)
        f.seek(0, 2)
        if f.tell() - data_at < count * dtype.itemsize:
            raise InputError(f"{name}: the file is shorter than its header says (truncated .npy array)")
        if np.issubdtype(dtype, np.floating) and count:
            f.seek(data_at)
            per_read = max(1, _SCAN_BYTES // dtype.itemsize)
            left = count
            while left:
                k = min(per_read, left)
                values = np.frombuffer(f.read(k * dtype.itemsize), dtype=dtype)
                if not np.isfinite(values).all():
                    raise InputError(f"{name}: array holds NaN or infinite values")
                left -= k
    return npy_names(view[0])
