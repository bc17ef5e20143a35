"""One uploaded input image of a job, by name, as a small PNG: what the web page shows beside
an aligned image (``GET /jobs/{id}/inputs/{name}``) and as a pair's source and target.

The image is found in what the job read (``ArtifactStore.job_input``) without decoding the rest
of the collection: a file of the input folder by its path, a zip member by its central
directory, a tar member by its header, an array image by its index. The input is decoded under
the service's upload limits (an image the upload check accepted decodes again), then shrunk
to ``max_side`` on its longer side. NumPy and Pillow only; never torch.
"""
from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from models.imageio import InputError, LoadLimits, decode_image, is_archive

__all__ = ["InputUnavailable", "input_png"]

_ARRAY_NAME = re.compile(r"(?:(.+)/)?(\d+)\.png")


class InputUnavailable(Exception):
    """The job's input has no such image, or this kind of input cannot be shown one at a time."""


def _read_capped(f, cap: int, name: str) -> bytes:
    data = f.read(cap + 1)
    if len(data) > cap:
        raise InputUnavailable(f"{name}: larger than {cap} bytes")
    return data


def _from_folder(root: Path, name: str, cap: int) -> bytes:
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise InputUnavailable(f"no input image named {name!r}")
    path = (root / name).resolve()
    if root.resolve() not in path.parents or not path.is_file() or path.is_symlink():
        raise InputUnavailable(f"no input image named {name!r}")
    with open(path, "rb") as f:
        return _read_capped(f, cap, name)


def _from_zip(path: Path, name: str, cap: int) -> bytes:
    with zipfile.ZipFile(path) as zf:
        for candidate in (name, name.replace("/", "\\")):  # members are named with either separator
            try:
                info = zf.getinfo(candidate)
            except KeyError:
                continue
            if info.file_size > cap:
                raise InputUnavailable(f"{name}: larger than {cap} bytes")
            with zf.open(info) as f:
                return _read_capped(f, cap, name)
    raise InputUnavailable(f"no input image named {name!r}")


def _from_tar(path: Path, name: str, cap: int) -> bytes:
    with tarfile.open(path) as tf:
        for m in tf:  # sequential: a compressed tar has no index to seek by
            if m.isfile() and m.name.replace("\\", "/").lstrip("./") == name:
                if m.size > cap:
                    raise InputUnavailable(f"{name}: larger than {cap} bytes")
                f = tf.extractfile(m)
                return _read_capped(f, cap, name)
    raise InputUnavailable(f"no input image named {name!r}")


def _from_arrays(path: Path, name: str, limits: LoadLimits) -> np.ndarray:
    from models.sources import ArraySource, open_source

    src = open_source(path, limits)
    if not isinstance(src, ArraySource):
        raise InputUnavailable("this input's images cannot be read one at a time")
    m = _ARRAY_NAME.fullmatch(name)
    index = None
    if m is not None and m.group(1) is None and len(src.shards) == 1:
        index = int(m.group(2))  # a single array: 000123.png is image 123
    else:
        names = src.names()
        index = names.index(name) if name in names else None
    if index is None or not 0 <= index < src.n:
        raise InputUnavailable(f"no input image named {name!r}")
    for _, images in src.chunks(1, index, index + 1):
        return images[0]
    raise InputUnavailable(f"no input image named {name!r}")  # pragma: no cover


def input_png(source: Path, name: str, max_side: int, limits: LoadLimits = LoadLimits()) -> bytes:
    """PNG bytes of input image ``name`` of ``source`` (a job's input folder, archive or array),
    at most ``max_side`` pixels on its longer side. Raises :class:`InputUnavailable`."""
    cap = limits.max_file_bytes
    low = source.name.lower()
    try:
        if source.is_dir():
            try:
                arr = decode_image(_from_folder(source, name, cap), name, limits)
            except InputUnavailable:
                # Not a file: an image of a folder of array shards has a name and no file. Only
                # then is the folder listed (a dataset folder may hold very many files).
                if not any(p.suffix.lower() in (".npy", ".npz") for p in source.iterdir()):
                    raise
                arr = _from_arrays(source, name, limits)
        elif low.endswith(".zip"):
            arr = decode_image(_from_zip(source, name, cap), name, limits)
        elif is_archive(low):
            arr = decode_image(_from_tar(source, name, cap), name, limits)
        elif low.endswith((".npy", ".npz")):
            arr = _from_arrays(source, name, limits)
        else:
            raise InputUnavailable(f"{source.name}: not an input this page can show")
    except (InputError, OSError, zipfile.BadZipFile, tarfile.TarError, ValueError) as e:
        raise InputUnavailable(f"{name}: cannot be read ({e})") from None
    im = Image.fromarray(np.ascontiguousarray(arr))
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # never enlarges
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
