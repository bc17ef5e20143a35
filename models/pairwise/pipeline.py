"""Pair jobs end to end: read pairs, estimate their homographies (batched), write the results.

This is what ``congeal pair``, the Python API and the service's pair jobs call.

Convention (:data:`CONVENTION`): each pair's ``matrix`` is ``source_from_target`` in pixels of
the *original* images: the target is the aligned output and ``warped_source(p) = source(M p)``.
Points move from the target to the source with ``M`` and back with its inverse
(:mod:`models.pairwise.points`).

Output folder::

    OUT/
      pairs.json             the convention, the method, and per pair: name, sizes, matrix,
                             confidence, aligned, transferred points, its files
      <name>/warped.png      the source resampled into the target's frame
      <name>/overlay.png     warped source in magenta over the target in green (grey where they agree)
      <name>/checkerboard.png  squares of the target and of the warped source, alternating

Dense methods (``semantic``, :mod:`models.semantic`) add per pair a ``warp`` (target pixel -> source
pixel through an affine map and a thin-plate spline, :mod:`models.pairwise.dense`) that moves the
points and makes the images, and ``<name>/flow.npy`` (``(H, W, 2)`` float32: the source pixel of every
target pixel); their ``matrix`` is the affine stage alone. A method that trained on the job's images
leaves its reusable pair model in ``OUT/model/``.

A pair whose confidence is below the method's threshold is reported with ``aligned: false``
(its matrix is still given, as the method's best guess) and gets no images; a pair the
method found nothing for has ``matrix: null``.

Working size: each image is resized (antialiased) so that its longer side is at most
``max_side`` for the estimate; the published matrix refers to the original pixels.
"""
from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry as G
from ..imageio import InputError, LoadLimits, decode_image, load_collection, save_png, working_size
from ..methods import Progress
from ..runtime import StagedOutput, resolve_device
from . import dense as DP
from . import points as P
from ..catalog import create_pair_method
from .methods import PairContext

__all__ = ["CONVENTION", "PairOptions", "PairInput", "PairResult", "align_pairs", "align_pair", "read_pairs_file",
           "load_pairs", "warp_source", "overlay", "checkerboard", "write_pairs", "run_pairs"]

CONVENTION = (
    "matrix: 3x3 homography in pixels mapping a pixel of the TARGET (the aligned output) to a pixel of the "
    "SOURCE: warped_source(p) = source(matrix @ p); points move target -> source with matrix and source -> "
    "target with its inverse; (x, y), x right, y down, pixel centres at integer coordinates, origin at the centre "
    "of the top-left pixel; resampling is bilinear"
)
# Pairs estimated together by default: a GPU takes many (the search's and the learned method's
# cost is per pair, not per image size); a CPU gains little from more than a few.
BATCH_GPU, BATCH_CPU = 256, 8


@dataclass(frozen=True)
class PairOptions:
    """User-facing options of a pair job (the CLI flags and the service's form fields)."""

    method: str = "search"
    device: str = "auto"
    max_side: int = 256  # longer side of the working size of each image
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    min_confidence: float | None = None  # None: the method's own threshold
    batch_size: int | None = None  # pairs estimated together; None: BATCH_GPU / BATCH_CPU


@dataclass
class PairInput:
    """One pair: images as ``uint8`` ``(H, W)`` / ``(H, W, 3)`` arrays (or float in [0, 1])."""

    source: np.ndarray
    target: np.ndarray
    name: str = ""
    source_name: str | None = None
    target_name: str | None = None


@dataclass
class PairResult:
    """One pair's answer. ``matrix`` is ``source_from_target`` in original pixels, or ``None``."""

    name: str
    matrix: np.ndarray | None
    confidence: float
    aligned: bool
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    method: str
    source_name: str | None = None
    target_name: str | None = None
    warp: dict | None = None  # dense methods: the full map (models.pairwise.dense); matrix: its affine stage

    def target_to_source(self, points) -> np.ndarray:
        """``(N, 2)`` target pixels -> source pixels."""
        if self.warp is not None:
            return DP.dense_target_to_source(self.warp, points)
        return P.target_to_source(self._m(), points)

    def source_to_target(self, points) -> np.ndarray:
        """``(N, 2)`` source pixels -> target pixels."""
        if self.warp is not None:
            return DP.dense_source_to_target(self.warp, points)
        return P.source_to_target(self._m(), points)

    def flow(self) -> np.ndarray:
        """``(H, W, 2)``: the source pixel of every target pixel (dense or from the matrix)."""
        if self.warp is not None:
            return DP.dense_flow(self.warp, self.target_size)
        H, W = self.target_size
        ys, xs = np.mgrid[0:H, 0:W]
        return P.apply_homography(self._m(), np.stack([xs.ravel(), ys.ravel()], 1)).reshape(H, W, 2).astype(np.float32)

    def _m(self) -> np.ndarray:
        return self.matrix if self.matrix is not None else np.full((3, 3), np.nan)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["warp"] is None:
            del d["warp"]
        d["matrix"] = None if self.matrix is None else np.asarray(self.matrix).tolist()
        d["source_size"], d["target_size"] = list(self.source_size), list(self.target_size)
        return d


# --------------------------------------------------------------------------- reading


def _read_image(path: Path, limits: LoadLimits) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise InputError(f"{path}: {size} bytes, above the limit of {limits.max_file_bytes}")
    return decode_image(path.read_bytes(), str(path), limits)


def read_pairs_file(path: str | Path) -> list[tuple[str, str, str]]:
    """A CSV of pairs: ``source,target[,name]`` a line (a header row naming ``source`` and ``target``
    is allowed); relative paths are relative to the file's folder. Returns ``(source, target, name)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pairs file")
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["source", "target"]:
        rows = rows[1:]
    out = []
    for i, r in enumerate(rows, 1):
        r = [c.strip() for c in r]
        if len(r) not in (2, 3) or not r[0] or not r[1]:
            raise InputError(f"{path}: pair {i}: expected 'source,target[,name]', got {','.join(r)!r}")
        src, tgt = (str(p if Path(p).is_absolute() else path.parent / p) for p in r[:2])
        out.append((src, tgt, r[2] if len(r) == 3 else ""))
    if not out:
        raise InputError(f"{path}: no pairs")
    return out


def load_pairs(specs: Sequence[tuple[str, str, str]], limits: LoadLimits = LoadLimits()) -> list[PairInput]:
    """Decode ``(source path, target path, name)`` triples (an image used twice is read once)."""
    cache: dict[str, np.ndarray] = {}

    def get(p: str) -> np.ndarray:
        if p not in cache:
            cache[p] = _read_image(Path(p), limits)
        return cache[p]

    return [PairInput(get(s), get(t), n, Path(s).name, Path(t).name) for s, t, n in specs]


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _names(pairs: Sequence[PairInput]) -> list[str]:
    """Unique, file-system safe names: the given ones (cleaned), else ``0000``, ``0001``, ..."""
    out, seen = [], set()
    for i, p in enumerate(pairs):
        base = _SAFE.sub("_", p.name).strip("._")[:100] or f"{i:04d}"
        name, k = base, 1
        while name in seen:
            k += 1
            name = f"{base}-{k}"
        seen.add(name)
        out.append(name)
    return out


# --------------------------------------------------------------------------- estimating


def _tensor(im: np.ndarray) -> torch.Tensor:
    """``(H, W[, 3])`` uint8 or float -> ``(C, H, W)`` float32 in [0, 1]."""
    a = np.asarray(im)
    x = torch.from_numpy(np.array(a)).float()  # a copy: the caller's array may be read-only
    if a.dtype == np.uint8:
        x = x / 255.0
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] not in (1, 3):
        raise InputError(f"an image must have 1 or 3 channels, not {x.shape[0]}")
    return x


def _resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _method(options: PairOptions):
    """The method and its confidence threshold; an unknown method, option or value is an input error."""
    try:
        method = create_pair_method(options.method, **options.method_options)
    except (TypeError, ValueError) as e:
        raise InputError(f"method {options.method}: {e}") from None
    threshold = options.min_confidence
    if threshold is None:
        threshold = getattr(method, "min_confidence", 0.5)
    return method, threshold


def align_pairs(pairs: Sequence[PairInput | tuple], options: PairOptions = PairOptions(), *,
                progress: Callable[[Progress], None] | None = None,
                should_stop: Callable[[], bool] | None = None, method=None) -> list[PairResult]:
    """Estimate the homography of every pair; pairs of one working size run as one batch.

    ``pairs``: :class:`PairInput` or ``(source, target)`` arrays. ``method``: an instance to use
    (one :func:`run_pairs` trained), else ``options.method`` is created.
    """
    pairs = [p if isinstance(p, PairInput) else PairInput(*p) for p in pairs]
    if not pairs:
        raise InputError("no pairs")
    names = _names(pairs)
    dev = resolve_device(options.device)
    if method is None:
        method, threshold = _method(options)
    else:
        threshold = options.min_confidence if options.min_confidence is not None else getattr(method, "min_confidence", 0.5)
    report = progress or (lambda p: None)
    src = [_tensor(p.source) for p in pairs]
    tgt = [_tensor(p.target) for p in pairs]
    wsize_s = [working_size([tuple(x.shape[-2:])], options.max_side) for x in src]
    wsize_t = [working_size([tuple(x.shape[-2:])], options.max_side) for x in tgt]
    groups: dict[tuple, list[int]] = {}
    for i in range(len(pairs)):
        groups.setdefault((wsize_s[i], src[i].shape[0], wsize_t[i], tgt[i].shape[0]), []).append(i)
    batch = options.batch_size or (BATCH_GPU if dev.type == "cuda" else BATCH_CPU)
    n, done = len(pairs), 0
    report(Progress("aligning", step=0, total=n, message=f"{n} pair(s) with {options.method}"))
    out: list[PairResult | None] = [None] * n
    for (ss, _, ts, _), idx in groups.items():
        for k in range(0, len(idx), batch):
            chunk = idx[k:k + batch]
            s = torch.stack([_resized(src[i], ss) for i in chunk]).to(dev)
            t = torch.stack([_resized(tgt[i], ts) for i in chunk]).to(dev)
            ctx = PairContext(seed=options.seed, should_stop=should_stop,
                              progress=lambda d, tot, stage, base=done, m=len(chunk): report(Progress(
                                  "aligning", step=base + round(m * d / max(1, tot)), total=n, message=stage)))
            ctx.check_stop()
            est = method.estimate(s, t, ctx)
            M = est.source_from_target_norm.detach().double().cpu()
            pix = G.pixel_from_normalised(M, ss, ts)
            for j, i in enumerate(chunk):
                rs = G.original_from_resized([tuple(src[i].shape[-2:])], ss)[0]
                rt = G.original_from_resized([tuple(tgt[i].shape[-2:])], ts)[0]
                m = rs @ pix[j] @ torch.linalg.inv(rt)
                m = m / m[2, 2] if torch.isfinite(m).all() and m[2, 2].abs() > 1e-12 else None
                conf = float(est.confidence[j])
                conf = conf if np.isfinite(conf) else 0.0
                warp = None
                if est.tps_dst is not None and m is not None:
                    # target pixel -> working normalised; spline; then the matrix and back to source pixels
                    pre = G.normaliser(*ts, dtype=torch.float64) @ torch.linalg.inv(rt)
                    post = rs @ torch.linalg.inv(G.normaliser(*ss, dtype=torch.float64)) @ M[j]
                    warp = {"type": DP.DENSE_TYPE, "pre": pre.tolist(), "tps_grid": int(est.tps_grid),
                            "tps_dst": est.tps_dst[j].detach().double().cpu().tolist(), "post": post.tolist()}
                out[i] = PairResult(names[i], None if m is None else m.numpy(), conf,
                                    m is not None and conf >= threshold, tuple(src[i].shape[-2:]),
                                    tuple(tgt[i].shape[-2:]), options.method, pairs[i].source_name,
                                    pairs[i].target_name, warp)
            done += len(chunk)
            report(Progress("aligning", step=done, total=n))
    return out  # type: ignore[return-value]


def align_pair(source, target, options: PairOptions = PairOptions()) -> PairResult:
    """One pair; ``source`` and ``target`` are each an image path or an array."""

    def image(x):
        return _read_image(Path(x), LoadLimits()) if isinstance(x, (str, Path)) else x

    names = [Path(x).name if isinstance(x, (str, Path)) else None for x in (source, target)]
    return align_pairs([PairInput(image(source), image(target), "", *names)], options)[0]


# --------------------------------------------------------------------------- images of a result


def warp_source(source: np.ndarray, matrix: np.ndarray, target_size: tuple[int, int], *,
                flow: np.ndarray | None = None) -> np.ndarray:
    """The source resampled into the target's frame, ``(H, W[, 3])`` float in [0, 1]; outside 0.
    ``flow`` ``(H, W, 2)`` (source pixels of the target's pixels), if given, replaces ``matrix``."""
    x = _tensor(source)[None].double()
    if flow is not None:
        h, w = x.shape[-2:]
        g = torch.from_numpy(np.asarray(flow, np.float64)).clone()
        g[..., 0] = g[..., 0] * (2 / max(w - 1, 1)) - 1
        g[..., 1] = g[..., 1] * (2 / max(h - 1, 1)) - 1
        out = F.grid_sample(x, g[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0].float().clamp(0, 1)
        return out[0].numpy() if out.shape[0] == 1 else out.permute(1, 2, 0).numpy()
    out = G.warp_pixel(x, torch.as_tensor(np.asarray(matrix), dtype=torch.float64)[None], tuple(target_size))
    out = out[0].float().clamp(0, 1)
    return out[0].numpy() if out.shape[0] == 1 else out.permute(1, 2, 0).numpy()


def _luma(im: np.ndarray) -> np.ndarray:
    a = _tensor(im).numpy()
    g = a[0] if a.shape[0] == 1 else np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), a, 1)
    lo, hi = np.percentile(g, [1, 99])
    return np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)


def overlay(warped: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB: warped source (luminance) in red and blue, target in green; grey where they agree."""
    w, t = _luma(warped), _luma(target)
    return np.stack([w, t, w], axis=-1)


def checkerboard(warped: np.ndarray, target: np.ndarray, squares: int = 8) -> np.ndarray:
    """Alternating squares of the target and the warped source (colour if either is)."""
    a, b = _tensor(target).numpy(), _tensor(warped).numpy()
    if a.shape[0] != b.shape[0]:
        a, b = (np.repeat(x, 3, 0) if x.shape[0] == 1 else x for x in (a, b))
    H, W = a.shape[-2:]
    side = max(1, round(max(H, W) / squares))
    yy, xx = np.mgrid[0:H, 0:W]
    mask = ((yy // side + xx // side) % 2).astype(bool)
    out = np.where(mask[None], b, a)
    return out[0] if out.shape[0] == 1 else out.transpose(1, 2, 0)


# --------------------------------------------------------------------------- writing


def write_pairs(out_dir: str | Path, pairs: Sequence[PairInput], results: Sequence[PairResult], *,
                points: Sequence[dict | None] | None = None, meta: dict | None = None,
                overwrite: bool = False, save_model: Callable[[Path], None] | None = None) -> dict:
    """Write the output folder (layout in the module docstring); returns what ``pairs.json`` holds.
    ``save_model(model_dir)``: writes the job's trained pair model into ``OUT/model``.

    ``points``: per pair ``None`` or ``{"target": [[x, y], ...], "source": [[x, y], ...]}``:
    target points are mapped into the source and source points into the target.
    """
    out_dir = Path(out_dir)
    entries = []
    with StagedOutput(out_dir, overwrite) as tmp:
        for i, (p, r) in enumerate(zip(pairs, results)):
            e = r.to_dict()
            pts = (points[i] if points is not None else None) or {}
            if pts:
                e["points"] = {
                    "target": _plain(pts.get("target")),
                    "target_in_source": _plain(r.target_to_source(pts["target"])) if pts.get("target") else [],
                    "source": _plain(pts.get("source")),
                    "source_in_target": _plain(r.source_to_target(pts["source"])) if pts.get("source") else [],
                }
            files = {}
            if r.matrix is not None and r.aligned:
                d = tmp / r.name
                d.mkdir(parents=True, exist_ok=True)
                flow = r.flow() if r.warp is not None else None
                w = warp_source(p.source, r.matrix, r.target_size, flow=flow)
                t = _tensor(p.target).numpy()
                t = t[0] if t.shape[0] == 1 else t.transpose(1, 2, 0)
                save_png(d / "warped.png", w)
                save_png(d / "overlay.png", overlay(w, t))
                save_png(d / "checkerboard.png", checkerboard(w, t))
                files = {k: f"{r.name}/{k}.png" for k in ("warped", "overlay", "checkerboard")}
                if flow is not None:
                    np.save(d / "flow.npy", flow)
                    files["flow"] = f"{r.name}/flow.npy"
            e["files"] = files
            entries.append(e)
        if save_model is not None:
            save_model(tmp / "model")
        doc = {"convention": CONVENTION, **(meta or {}), "n_pairs": len(entries),
               "n_aligned": sum(1 for e in entries if e["aligned"]), "pairs": entries}
        if save_model is not None:
            doc["model"] = "model"
        (tmp / "pairs.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
    return doc


def _plain(a) -> list | None:
    """Points as JSON: lists of [x, y], ``None`` for a point sent to infinity."""
    if a is None:
        return None
    return [None if not np.isfinite(q).all() else [float(q[0]), float(q[1])] for q in np.asarray(a, np.float64)
            .reshape(-1, 2)]


def run_pairs(specs: Sequence[tuple[str, str, str]], out_dir: str | Path, options: PairOptions = PairOptions(), *,
              points: Sequence[dict | None] | None = None, progress: Callable[[Progress], None] | None = None,
              should_stop: Callable[[], bool] | None = None, limits: LoadLimits = LoadLimits(),
              collection: str | Path | None = None, overwrite: bool = False) -> dict:
    """Read ``(source, target, name)`` pairs, align them, write ``out_dir``; returns the summary
    (``pairs.json`` without its per-pair list, plus the confidence's mean and minimum).

    ``source`` and ``target`` are image paths, or, with ``collection`` (a folder or archive that
    :func:`models.imageio.load_collection` reads), the names of images in it.
    """
    t0 = time.time()
    method, _ = _method(options)  # fail before reading anything
    dev = resolve_device(options.device)
    report = progress or (lambda p: None)
    report(Progress("loading", message="reading images"))
    if collection is None:
        pairs = load_pairs(specs, limits)
    else:
        col = load_collection(collection, limits)
        images = dict(zip(col.names, col.images))
        missing = sorted({n for s, t, _ in specs for n in (s, t)} - set(images))
        if missing:
            raise InputError(f"pairs name image(s) that are not in the input: {', '.join(missing[:5])}")
        pairs = [PairInput(images[s], images[t], n, s, t) for s, t, n in specs]
    trained = False
    if hasattr(method, "fit_collection"):
        # A method that learns from the job's images (the collection if given, else the pairs' images)
        # trains once, before any pair, and its model is written with the results.
        pool = list(col.images) if collection is not None else list({id(a): a for p in pairs
                                                                      for a in (p.source, p.target)}.values())
        trained = method.fit_collection(pool, dev, progress=report, should_stop=should_stop)
    results = align_pairs(pairs, options, progress=progress, should_stop=should_stop, method=method)
    report(Progress("writing", message="writing results"))
    meta = {"method": options.method, "device": str(dev),
            "max_side": options.max_side, "seconds": round(time.time() - t0, 3)}
    doc = write_pairs(out_dir, pairs, results, points=points, meta=meta, overwrite=overwrite,
                      save_model=method.save if trained else None)
    report(Progress("done"))
    conf = [e["confidence"] for e in doc["pairs"]]
    n_images = len({id(p.source) for p in pairs} | {id(p.target) for p in pairs})
    return {k: v for k, v in doc.items() if k not in ("pairs", "convention")} | {
        "n_images": n_images, "confidence_mean": float(np.mean(conf)), "confidence_min": float(np.min(conf))}
