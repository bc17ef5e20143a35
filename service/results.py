"""Per-image results of a finished job, a page at a time, in bounded memory.

Large outputs (the job output contract, ``models/pipeline.py``) keep per-image data in arrays:
``transforms.npy`` float64 ``(N, 3, 3)``, ``per_image.npy`` (a structured array, one row per
image), ``names.txt`` (one name a line) and ``names.idx.npy`` int64 ``(N + 1,)`` (each line's byte
offset). They are opened with ``np.load(mmap_mode="r", allow_pickle=False)``: a page reads the
pages of the files it covers and nothing else, however large N is. Outputs written before
those arrays existed (and small jobs' JSON) are read from ``transforms.json`` and
``metrics.json`` instead, parsed once and cached, so every job pages the same way.

NumPy only; never torch.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ResultsUnavailable", "PerImageSource", "open_per_image"]
_FLOAT_FIELDS = ("residual", "content_kept", "area_scale", "edge_contact", "consistency_px")
_BOOL_FIELDS = ("outlier",)
_OPTIONAL_BOOL_FIELDS = ("touches_edge", "fallback")  # int8, -1: not checked
_JSON_CACHE_MAX = 4


class ResultsUnavailable(Exception):
    """The output folder lacks what a page needs, or holds arrays that disagree."""


def _num(v) -> float | None:
    v = float(v)
    return round(v, 4) if math.isfinite(v) else None


@dataclass
class PerImageSource:
    """One job's per-image results. ``rows(offset, limit)`` builds one page."""

    total: int
    source: str  # "arrays" or "json"
    aligned_pngs: bool
    _matrix: Any = None  # (N, 3, 3) memmap
    _per: Any = None  # (N,) structured memmap, or None
    _idx: Any = None  # (N + 1,) memmap
    _names_path: Path | None = None
    _json_rows: list[dict] | None = None
    _order: Any = None  # (N,) int64, filled by by_residual()

    def by_residual(self) -> np.ndarray:
        """``(N,)`` int64: every index, largest residual first (outliers first); images with no
        residual (NaN) first of all, then ties in index order. Computed once per source: N floats."""
        if self._order is None:
            if self._json_rows is not None:
                r = np.array([np.nan if x.get("residual") is None else x["residual"] for x in self._json_rows],
                             dtype=np.float64)
            elif self._per is not None and "residual" in (self._per.dtype.names or ()):
                r = np.asarray(self._per["residual"], dtype=np.float64)
            else:
                r = np.zeros(self.total)
            r = np.nan_to_num(r, nan=np.inf, posinf=np.inf)
            self._order = np.argsort(-r, kind="stable").astype(np.int64)
        return self._order

    def rows_at(self, indices) -> list[dict]:
        """The rows of ``indices``, in that order."""
        return [self.rows(int(i), 1)[0] for i in indices]

    def rows(self, offset: int, limit: int) -> list[dict]:
        if offset >= self.total:
            return []
        stop = min(self.total, offset + limit)
        if self._json_rows is not None:
            return [dict(r) for r in self._json_rows[offset:stop]]
        return self._array_rows(offset, stop)

    def _array_rows(self, a: int, b: int) -> list[dict]:
        bounds = np.asarray(self._idx[a:b + 1], dtype=np.int64)
        with open(self._names_path, "rb") as f:
            f.seek(int(bounds[0]))
            blob = f.read(int(bounds[-1] - bounds[0]))
        rel = bounds - bounds[0]
        names = [blob[rel[i]:rel[i + 1]].rstrip(b"\n").decode("utf-8", errors="replace") for i in range(b - a)]
        mats = np.asarray(self._matrix[a:b], dtype=np.float64).tolist()
        rows = [{"index": a + i, "name": names[i], "matrix": mats[i]} for i in range(b - a)]
        if self._per is None:
            return rows
        per = np.asarray(self._per[a:b])
        fields = set(per.dtype.names or ())
        for k in _FLOAT_FIELDS:
            if k in fields:
                for r, v in zip(rows, per[k]):
                    r[k] = _num(v)
        for k in _BOOL_FIELDS:
            if k in fields:
                for r, v in zip(rows, per[k]):
                    r[k] = bool(v)
        for k in _OPTIONAL_BOOL_FIELDS:
            if k in fields:
                for r, v in zip(rows, per[k]):
                    r[k] = None if int(v) < 0 else bool(v)
        if "fill" in fields:
            for r, v in zip(rows, per["fill"]):
                r["fill"] = [_num(x) for x in np.atleast_1d(v)]
        if "input_size" in fields:
            for r, v in zip(rows, per["input_size"]):
                r["input_size"] = [int(x) for x in np.atleast_1d(v)]
        return rows


def _load(path: Path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ResultsUnavailable(f"{path.name} cannot be read ({e})") from None


def _from_arrays(out: Path, aligned_pngs: bool) -> PerImageSource:
    matrix, idx = _load(out / "transforms.npy"), _load(out / "names.idx.npy")
    if matrix.ndim != 3 or matrix.shape[1:] != (3, 3):
        raise ResultsUnavailable(f"transforms.npy has shape {matrix.shape}, not (N, 3, 3)")
    n = matrix.shape[0]
    if idx.shape != (n + 1,) or not np.issubdtype(idx.dtype, np.integer):
        raise ResultsUnavailable(f"names.idx.npy has shape {idx.shape}, not ({n + 1},)")
    if not (out / "names.txt").is_file():
        raise ResultsUnavailable("names.txt is missing")
    per = None
    if (out / "per_image.npy").is_file():
        per = _load(out / "per_image.npy")
        if per.shape != (n,) or per.dtype.names is None:
            raise ResultsUnavailable(f"per_image.npy has shape {per.shape}, not ({n},) structured")
    return PerImageSource(total=n, source="arrays", aligned_pngs=aligned_pngs, _matrix=matrix, _per=per, _idx=idx,
                          _names_path=out / "names.txt")


def _json_rows(transforms: dict, metrics: dict | None) -> list[dict]:
    images = transforms["images"]
    per = (metrics or {}).get("per_image") or []
    if len(per) != len(images):
        per = [{}] * len(images)
    rows = []
    for i, (t, m) in enumerate(zip(images, per)):
        row = {"index": i, "name": t["name"], "matrix": t["matrix"], "fill": t.get("fill"),
               "input_size": t.get("input_size")}
        for k in (*_FLOAT_FIELDS, *_BOOL_FIELDS, *_OPTIONAL_BOOL_FIELDS):
            row[k] = m.get(k)
        rows.append(row)
    return rows


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ResultsUnavailable(f"{path.name} cannot be read ({e})") from None


def open_per_image(out: Path) -> PerImageSource:
    """The per-image results of the output folder ``out``: from its arrays when it has them,
    else from its JSON. Raises :class:`ResultsUnavailable`."""
    tj = out / "transforms.json"
    try:
        st = tj.stat()
    except FileNotFoundError:
        raise ResultsUnavailable("transforms.json is missing from the artifact store") from None
    key = (str(out), st.st_mtime_ns, st.st_size, (out / "transforms.npy").is_file())
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    transforms = _read_json(tj)
    # Outputs are written once and renamed into place, so (path, mtime, size) names one version.
    aligned_pngs = isinstance(transforms.get("images"), list)
    if key[3]:
        src = _from_arrays(out, aligned_pngs)
    elif aligned_pngs:
        src = PerImageSource(total=len(transforms["images"]), source="json", aligned_pngs=True,
                             _json_rows=_json_rows(transforms, _read_json(out / "metrics.json")))
    else:
        raise ResultsUnavailable("transforms.json lists no images and the output has no transforms.npy")
    with _cache_lock:
        _cache[key] = src
        while len(_cache) > _JSON_CACHE_MAX:
            _cache.popitem(last=False)
    return src
