"""End-to-end jobs: read a collection, fit a method, write every output, at any size.

This is what the CLI and the Celery worker call. Output folder layout::

    OUT/
      aligned/<name>.png        aligned images (output frame = working size); or aligned/shard-00000.npy ...
      transforms.json           convention, sizes, and per image (small jobs): name, 3x3 matrix, fill
      transforms.npy            (N, 3, 3) float64: every image's matrix, in index order
      names.txt, names.idx.npy  the images' names, one a line, and each line's byte offset
      per_image.npy             per-image metrics, a structured array (fields in PER_IMAGE_DTYPE)
      metrics.json              APSNR before/after, counts, seconds, summaries (per image: small jobs)
      mean_before.png  var_before.png  mean_after.png  var_after.png
      report.html               the result as a page to look at, self-contained (models.report)
      model/                    trained aligner (config.json + *.safetensors), if any

Everything is written to a temporary sibling folder and renamed into place at
the end, so a folder named OUT is always complete.

Scale: the collection is read from its source a chunk at a time (``models.sources``), resized
to the working size as uint8 (in memory up to ``HOST_WORK_BYTES``, else in a scratch file beside
the output), trained on from the device, and the outputs are computed and written a chunk at a
time. Host memory is bounded by the working set's uint8 bytes (or, above the budget, by a chunk),
plus one chunk of originals.

Working size: see :func:`models.imageio.working_size`. Each image is resized
to it (antialiased bilinear) for fitting; the published transforms map the
aligned output pixel to a pixel of the *original* image, and the aligned
images are resampled from the originals with exactly those transforms.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import geometry as G
from . import metrics as M
from . import report as R
from .catalog import create_method, load_aligner
from .imageio import Collection, InputError, LoadLimits, save_png, working_size
from .imageops import background
from .methods import Cancelled, FitContext, Progress, shard_bounds
from .runtime import StagedOutput, check_out_dir, resolve_device
from .sources import CollectionSource, Source, open_source

__all__ = [
    "AlignOptions",
    "AlignReport",
    "CONVENTION",
    "SMALL_JOB_MAX",
    "PER_IMAGE_DTYPE",
    "resolve_device",
    "check_out_dir",
    "align_collection",
    "apply_model",
    "aligned_file_names",
    "Cancelled",
    "InputError",
]

# Up to this many images a job's JSON files list every image (as they always did) and the aligned
# images are PNGs by default; above it the per-image data lives in the array files only.
SMALL_JOB_MAX = 10_000
# The working set (uint8, working size) is kept in memory up to this many bytes, else in a
# scratch file read a chunk at a time.
HOST_WORK_BYTES = 4 * 1024**3
# Baselines hold the whole collection as float64 matrices (SVD-based): refused above this.
BASELINE_MAX_IMAGES = 100_000
ALIGNED_SHARD = 65_536

CONVENTION = (
    "matrix is a 3x3 homography in pixel coordinates mapping a pixel (x, y, 1) of the aligned "
    "output image to a pixel of the original input image (backward map: aligned(p) = input(H p)); "
    "pixel centres are at integer coordinates, origin at the centre of the top-left pixel, x to the "
    "right, y down; samples outside the input take the image's 'fill' value (0-255, per channel); "
    "resampling is bilinear"
)


@dataclass(frozen=True)
class AlignOptions:
    """User-facing job options (the CLI flags and the API's job fields)."""

    method: str = "dprc"
    warp: str = "homography"
    reference: str | None = None  # an image name; None: the method's automatic rule
    budget: int | None = None  # epochs (DPRC) or outer iterations (baselines)
    seed: int = 0
    device: str = "auto"
    max_side: int = 128
    method_options: dict = field(default_factory=dict)
    # "png" (one file per image), "npy" (uint8 shards of ALIGNED_SHARD images), "none", or
    # "auto": png up to SMALL_JOB_MAX images, none above.
    aligned: str = "auto"
    # Processes of one job, one per GPU (models.distributed); with device "cpu", CPU processes over gloo.
    gpus: int = 1


@dataclass
class AlignReport:
    out_dir: str
    n_images: int
    apsnr_before: float | None
    apsnr_after: float | None
    seconds: float
    method: str
    warp: str
    reference: str | None
    model_dir: str | None
    n_outliers: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# Per-image results in per_image.npy (a structured array: no pickles, memory-mappable).
def per_image_dtype(channels: int) -> np.dtype:
    return np.dtype([("residual", "<f4"), ("outlier", "?"), ("content_kept", "<f4"), ("area_scale", "<f4"),
                     ("edge_contact", "<f4"), ("touches_edge", "i1"), ("consistency_px", "<f4"),
                     ("fill", "<f4", (channels,)), ("input_size", "<i4", (2,)), ("fallback", "i1")])


PER_IMAGE_DTYPE = per_image_dtype(1)


def _channels(im: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3 and im.ndim == 2:
        return np.repeat(im[..., None], 3, axis=2)
    if channels == 1 and im.ndim == 3:
        return np.round(im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return im


def _to_work(images, size: tuple[int, int], channels: int) -> np.ndarray:
    """A chunk of source images -> uint8 ``(k, C, H, W)`` at the working size (antialiased bilinear).

    ``images``: a list of ``(H, W)`` / ``(H, W, 3)`` arrays, or one uniform array ``(k, H, W[, 3])``
    whose channels already match (:class:`models.sources.ArraySource`)."""
    if isinstance(images, np.ndarray):
        if images.shape[1:3] == tuple(size):
            return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))
        images = list(images)
    out = np.empty((len(images), channels, *size), dtype=np.uint8)
    for i, im in enumerate(images):
        r = _resized_u8(_channels(im, channels), size)
        out[i] = r[None] if r.ndim == 2 else r.transpose(2, 0, 1)
    return out


def _resized_u8(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    if im.shape[:2] == (h, w):
        return im
    return np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR, reducing_gap=None))


def aligned_file_names(names: list[str]) -> list[str]:
    """``aligned/<name with its extension replaced by .png>``; ``<name>.png`` where that collides."""
    stems = [str(Path(n).with_suffix(".png")) for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return ["aligned/" + (s if counts[s] == 1 else n + ".png") for s, n in zip(stems, names)]


# A job whose median aligned frame keeps less of the objects than this (or shows them at less
# than a quarter of their area) gets a warning: the benchmark target for content kept.
KEPT_WARN, AREA_WARN = M.CONTENT_KEPT_MIN, 4.0


def _framing_warnings(kept: torch.Tensor, area: torch.Tensor) -> list[str]:
    out = []
    if len(kept) and float(kept.median()) < KEPT_WARN:
        out.append(f"the aligned frames keep a median {float(kept.median()):.2f} of each image's content "
                   f"(< {KEPT_WARN}): the alignment crops into the objects, and a high APSNR does not mean "
                   "a good alignment here; DPRC's option reframe (on by default) fits again with its moment "
                   "regulariser when this happens, and a larger moment_weight keeps more content at some cost "
                   "in consistency (docs/research/quality-rounds-1-9.md)")
    if len(area) and float(area.median()) > AREA_WARN:
        out.append(f"the aligned frames show the objects at 1/{float(area.median()):.1f} of their area: "
                   "the alignment shrinks them")
    return out


def _lost_warnings(n: int, total: int) -> list[str]:
    # Image by image (n of total lost, models.metrics.lost_images): the median checks above pass a
    # fit that lost a minority of its images.
    if n == 0:
        return []
    return [f"{n} of {total} images ({n / total:.1%}) lost their object in the aligned frame: it keeps "
            f"less than {M.LOST_KEPT:.0%} of the object, or shows it at more than {M.LOST_AREA:g} times or less "
            f"than 1/{M.LOST_AREA:g} of its area (per_image[].content_kept and area_scale show which)"]


def _fallback_warnings(n: int, total: int) -> list[str]:
    if n == 0:
        return []
    return [f"{n} of {total} images ({n / total:.1%}) got the initial (moment) alignment instead of the learned "
            "one: the learned warp sent the aligned frame's centre off the image, put a corner behind the horizon "
            f"or changed the object's scale more than {M.LOST_AREA:g}-fold (per_image[].fallback lists them; they "
            "are aligned only coarsely)"]


def _edge_warnings(touching: torch.Tensor | None) -> list[str]:
    if touching is None or len(touching) == 0 or float(touching.double().mean()) < 0.5:
        return []
    return [f"{int(touching.sum())} of {len(touching)} images have their object touching the image border: "
            "part of each may lie outside its image, and two images cut differently cannot be aligned "
            "consistently (per_image[].touches_edge lists them; docs/research/quality-rounds-1-9.md, \"Objects cut by "
            "the border\")"]


def _consistency_summary(moved: torch.Tensor | None, probe: torch.Tensor | None,
                         object_ratio: float | None = None, object_sample: int = 0) -> dict | None:
    if moved is None or len(moved) == 0:
        return None
    s = {
        "probe_sigma": M.CONSISTENCY_SIGMA,
        "moved_median_px": round(float(moved.median()), 4),
        "probe_median_px": round(float(probe.median()), 4),
        "ratio": round(M.consistency_ratio(moved, probe), 4),
    }
    if object_ratio is not None:
        s.update(object_ratio=round(object_ratio, 4), object_sample=object_sample)
    return s


def _consistency_warnings(s: dict | None) -> list[str]:
    r = None if s is None else s.get("object_ratio")
    if r is None or r <= M.CONSISTENCY_WARN:
        return []
    return [f"the aligner is not self-consistent: re-warping each image by a known {M.CONSISTENCY_SIGMA:.0%} "
            f"perturbation moves where its aligned frame puts the object {r:.2f} times as far as the "
            f"perturbation itself (> {M.CONSISTENCY_WARN}); expect two views of one object to be aligned differently"]


def _hwc(img: np.ndarray) -> np.ndarray:
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def _open(source, limits: LoadLimits) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, Collection):
        return CollectionSource(source)
    return open_source(source, limits)


# --------------------------------------------------------------------------- the working set


@dataclass
class _Work:
    """The collection at the working size: ``x`` uint8 ``(N, C, H, W)`` (in memory or a scratch
    memory map) and each image's background ``bg`` ``(N, C)`` float32 in [0, 1]."""

    x: np.ndarray
    bg: np.ndarray
    size: tuple[int, int]
    scratch: Path | None = None
    start: int = 0  # global index of x[0]

    def close(self) -> None:
        if self.scratch is not None:
            del self.x
            shutil.rmtree(self.scratch, ignore_errors=True)


def _chunk_for(size: tuple[int, int], channels: int, target_bytes: int = 64 * 1024**2) -> int:
    return int(max(256, min(262_144, target_bytes // max(1, size[0] * size[1] * channels * 4))))


def _ingest(src: Source, size: tuple[int, int], channels: int, scratch_parent: Path,
            report: Callable[[Progress], None], should_stop, start: int = 0, stop: int | None = None) -> _Work:
    """Images ``start:stop`` of the source at the working size (``_Work.start`` says where they begin)."""
    stop = src.n if stop is None else stop
    N = stop - start
    nbytes = N * channels * size[0] * size[1]
    scratch = None
    if nbytes <= HOST_WORK_BYTES:
        x = np.empty((N, channels, *size), dtype=np.uint8)
    else:
        scratch = scratch_parent / f".congeal-work-{uuid.uuid4().hex[:8]}"
        scratch.mkdir(parents=True)
        x = np.lib.format.open_memmap(scratch / "work.npy", mode="w+", dtype=np.uint8, shape=(N, channels, *size))
    bg = np.empty((N, channels), dtype=np.float32)
    chunk = _chunk_for(size, channels)
    for k, images in src.chunks(chunk, start, stop):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        w = _to_work(images, size, channels)
        i = k - start
        x[i:i + len(w)] = w
        bg[i:i + len(w)] = background(torch.from_numpy(w).float().div_(255))[..., 0, 0].numpy()
        report(Progress("loading", step=i + len(w), total=N, message="reading images"))
    if scratch is not None:
        x.flush()
        x = np.load(scratch / "work.npy", mmap_mode="r")
    return _Work(x, bg, size, scratch, start)


def _rows(a: np.ndarray, k: int, n: int) -> torch.Tensor:
    """Rows ``k:k + n`` of a host array (possibly a read-only memory map) as a CPU tensor of their own."""
    return torch.from_numpy(np.array(a[k:k + n]))


def _to_device(a: np.ndarray, dev: torch.device, chunk: int = 1 << 20) -> torch.Tensor:
    """A host array (possibly memory-mapped) onto the device, a chunk at a time."""
    out = torch.empty(a.shape, dtype=_rows(a, 0, 1).dtype, device=dev)
    for k in range(0, a.shape[0], chunk):
        out[k:k + chunk].copy_(_rows(a, k, chunk))
    return out


def _find_name(src: Source, name: str, chunk: int = 1 << 16) -> int | None:
    for k in range(0, src.n, chunk):
        names = src.names(k, min(src.n, k + chunk))
        if name in names:
            return k + names.index(name)
    return None


# --------------------------------------------------------------------------- jobs


def align_collection(source: str | os.PathLike | Collection | Source, out_dir: str | os.PathLike,
                     options: AlignOptions = AlignOptions(), *,
                     progress: Callable[[Progress], None] | None = None,
                     checkpoint_dir: str | os.PathLike | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     limits: LoadLimits = LoadLimits(), overwrite: bool = False,
                     rank: int = 0, world: int = 1) -> AlignReport | None:
    """Congeal a collection and write the output folder (layout in the module docstring).

    ``world > 1``: this is process ``rank`` of a distributed job (``torch.distributed`` initialised;
    :mod:`models.distributed` launches it): it trains on its shard and rank 0 writes the outputs;
    other ranks return None.

    Every precondition (options, method options, device, output folder, input, reference) is
    checked before any image is resized or any step trained.

    Raises:
        InputError: unreadable/empty input, fewer than 2 images, unknown reference, an output folder
            that cannot be written, a device this machine does not have.
        ValueError: an unknown method, warp or method option.
        Cancelled: ``should_stop()`` became true.
    """
    t0 = time.time()
    method, device = _check_job(options, out_dir, overwrite, world)
    if options.gpus > 1 and world == 1:
        if isinstance(source, (Collection, Source)):
            raise InputError("a job over several processes reads its input from a path")
        _check_input(_open(source, limits), options)  # here too: the launch itself takes seconds
        from .distributed import launch

        return launch(source, out_dir, options, options.gpus, progress=progress, checkpoint_dir=checkpoint_dir,
                      limits=limits, overwrite=overwrite, should_stop=should_stop)
    report = progress or (lambda p: None)
    report(Progress("loading", message="reading images"))
    src = _open(source, limits)
    ref_index = _check_input(src, options)
    if hasattr(method, "check_size"):  # methods for small collections refuse a big one before it is read
        method.check_size(len(src))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    channels = src.channels
    sizes = [src.uniform_size] if src.uniform_size is not None else [tuple(s) for s in src.sizes()]
    wsize = working_size(sizes, options.max_side)
    out_dir = Path(out_dir)
    lo, hi = shard_bounds(len(src), world)[rank:rank + 2]
    stages = {"opening": round(time.time() - t0, 3)}
    t_stage = time.time()
    # Rank 0 reads everything: it writes every output. The others read their shard.
    work = _ingest(src, wsize, channels, out_dir.parent, report, should_stop,
                   *((0, len(src)) if rank == 0 else (lo, hi)))
    stages["reading"] = round(time.time() - t_stage, 3)
    try:
        ctx = FitContext(
            warp=options.warp, reference_index=ref_index, seed=options.seed, budget=options.budget,
            progress=report, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            should_stop=should_stop, rank=rank, world=world, n_total=len(src),
        )
        t_stage = time.time()
        x_dev = _to_device(work.x[lo - work.start:hi - work.start], device)
        bg_dev = torch.from_numpy(work.bg[lo - work.start:hi - work.start])[..., None, None].to(device)
        stages["to_device"] = round(time.time() - t_stage, 3)
        t_stage = time.time()
        if options.method == "dprc":
            result = method.fit(x_dev, ctx, bg=bg_dev)
        else:
            result = method.fit(x_dev.float().div_(255), ctx)
        stages["fit"] = round(time.time() - t_stage, 3)
        stages.update({f"fit_{k}": v for k, v in result.timings.items()})
        del x_dev
        if world > 1:
            from .collective import all_gather_rows

            result.in_from_out_norm = all_gather_rows(result.in_from_out_norm, device)
            if result.fallback is not None:
                result.fallback = all_gather_rows(result.fallback.to(torch.uint8), device).bool()
            if rank != 0:
                return None
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        report(Progress("writing", message="writing outputs"))
        ref_name = src.names(result.reference_index, result.reference_index + 1)[0] \
            if result.reference_index is not None else None
        meta = {
            "method": options.method, "warp": options.warp, "reference": ref_name,
            "device": str(device), "working_size": list(wsize), "channels": channels,
            "seed": options.seed, "options": {k: v for k, v in asdict(options).items() if k != "device"},
            "history": result.history[-200:], "notes": result.notes, "schedule": result.plan,
        }
        with StagedOutput(out_dir, overwrite) as tmp:
            model_dir = None
            if result.aligner is not None:
                result.aligner.save(tmp / "model")
                (tmp / "model" / "pipeline.json").write_text(json.dumps(
                    {"working_size": list(wsize), "channels": channels, "warp": options.warp,
                     "method": options.method, "max_side": options.max_side}, indent=1))
                model_dir = str(out_dir / "model")
            align = None if result.aligner is None else (lambda b: result.aligner.align(b.to(device)))
            metrics = _finish(tmp, src, work, result.in_from_out_norm, meta, align, device, options.aligned,
                              report, should_stop, t0, stages=stages, warnings=result.warnings,
                              warps_are_aligned=getattr(result.aligner, "reproduces_fit", False),
                              fallback=result.fallback)
    finally:
        work.close()
    report(Progress("done", apsnr=metrics["apsnr_after"]))
    return AlignReport(str(out_dir), len(src), metrics["apsnr_before"], metrics["apsnr_after"],
                       metrics["seconds"], options.method, options.warp, ref_name, model_dir,
                       metrics["residual_summary"]["n_outliers"], metrics["warnings"])


def _check_job(options: AlignOptions, out_dir, overwrite: bool, world: int):
    """The options, method, device and output folder, checked before any work; returns the
    method and the device."""
    if options.gpus < 1:
        raise InputError(f"gpus={options.gpus}: at least 1")
    G.get_family(options.warp)
    _check_aligned(options.aligned)
    method = create_method(options.method, **options.method_options)
    if (world > 1 or options.gpus > 1) and options.method != "dprc":
        raise InputError(f"method {options.method} runs in one process; only dprc trains over several GPUs")
    device = resolve_device(options.device)
    if world == 1 and options.gpus > 1 and device.type == "cuda" and options.gpus > torch.cuda.device_count():
        raise InputError(f"--gpus {options.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    check_out_dir(out_dir, overwrite)
    return method, device


def _check_input(src: Source, options: AlignOptions) -> int | None:
    """Enough images, the reference among them, a size the method takes; returns the reference's index."""
    if len(src) < 2:
        raise InputError(f"{len(src)} image(s): congealing needs at least 2 images")
    ref_index = None
    if options.reference is not None:
        ref_index = _find_name(src, options.reference)
        if ref_index is None:
            raise InputError(f"reference {options.reference!r} is not one of the collection's image names")
    if options.method != "dprc" and len(src) > BASELINE_MAX_IMAGES:
        raise InputError(f"{len(src)} images: method {options.method} holds the whole collection in memory and "
                         f"takes at most {BASELINE_MAX_IMAGES}; dprc takes any number")
    return ref_index


def _check_aligned(mode: str) -> None:
    if mode not in ("auto", "png", "npy", "none"):
        raise InputError(f"aligned={mode!r}: choose one of auto, png, npy, none")


def apply_model(model_dir: str | os.PathLike, source: str | os.PathLike | Collection | Source,
                out_dir: str | os.PathLike, *, device: str = "auto",
                progress: Callable[[Progress], None] | None = None,
                limits: LoadLimits = LoadLimits(), overwrite: bool = False,
                batch_size: int | None = None, aligned: str = "auto",
                should_stop: Callable[[], bool] | None = None) -> AlignReport:
    """Align new images with a trained aligner in one forward pass (no re-fitting).

    Writes the same layout as :func:`align_collection` minus ``model/``. The model folder, options,
    device, output folder and input are checked before any image is read.
    """
    t0 = time.time()
    report = progress or (lambda p: None)
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"{model_dir}: no such folder")
    pj = model_dir / "pipeline.json"
    if not pj.is_file():
        raise InputError(f"{model_dir}: not a trained model folder (no pipeline.json; 'congeal align' writes "
                         "one in OUT/model)")
    _check_aligned(aligned)
    pipe = json.loads(pj.read_text())
    dev = resolve_device(device)
    check_out_dir(out_dir, overwrite)
    src = _open(source, limits)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    aligner = load_aligner(model_dir, dev)
    report(Progress("loading", message="reading images"))
    wsize = tuple(pipe["working_size"])
    channels = int(pipe["channels"])
    out_dir = Path(out_dir)
    work = _ingest(src, wsize, channels, out_dir.parent, report, should_stop)
    try:
        batch = batch_size or (32768 if dev.type == "cuda" else 512)
        report(Progress("aligning", total=len(src)))
        warps = torch.empty(len(src), 3, 3)
        # an aligner that can say which images got its fallback warp (DPRCAligner.align_flagged)
        flagged = getattr(aligner, "align_flagged", None)
        flags: list[torch.Tensor | None] = []
        with torch.no_grad():
            for k in range(0, len(src), batch):
                xb = _rows(work.x, k, batch).to(dev)
                w, f = flagged(xb) if flagged is not None else (aligner.align(xb), None)
                warps[k:k + len(xb)] = w.float().cpu()
                flags.append(None if f is None else f.cpu())
                report(Progress("aligning", step=min(k + batch, len(src)), total=len(src)))
        fallback = torch.cat(flags) if flags and all(f is not None for f in flags) else None
        meta = {"method": pipe["method"], "warp": pipe["warp"], "reference": None, "device": str(dev),
                "working_size": list(wsize), "channels": channels, "model_dir": str(model_dir)}
        with StagedOutput(out_dir, overwrite) as tmp:
            metrics = _finish(tmp, src, work, warps, meta, lambda b: aligner.align(b.to(dev)), dev, aligned,
                              report, should_stop, t0, warps_are_aligned=True, fallback=fallback)
    finally:
        work.close()
    report(Progress("done"))
    return AlignReport(str(out_dir), len(src), metrics["apsnr_before"], metrics["apsnr_after"],
                       metrics["seconds"], pipe["method"], pipe["warp"], None, None,
                       metrics["residual_summary"]["n_outliers"], metrics["warnings"])


# --------------------------------------------------------------------------- outputs


class _Writer:
    """Aligned images, written as they are made: PNG files on a few threads, or uint8 shards."""

    def __init__(self, tmp: Path, mode: str, n: int, size: tuple[int, int], channels: int):
        self.tmp, self.mode, self.n, self.size, self.channels = tmp, mode, n, size, channels
        self.pool = ThreadPoolExecutor(max_workers=4) if mode == "png" else None
        self.futures = []
        self.shard: np.ndarray | None = None

    def write(self, start: int, files: list[str] | None, u8: np.ndarray) -> None:
        """``u8`` ``(k, C, H, W)`` aligned images ``start .. start + k``."""
        if self.mode == "png":
            for f, img in zip(files, u8):
                self.futures.append(self.pool.submit(save_png, self.tmp / f, _hwc(img)))
            if len(self.futures) > 4096:
                for fu in self.futures:
                    fu.result()
                self.futures = []
        elif self.mode == "npy":
            i = start
            while i < start + len(u8):
                s, off = divmod(i, ALIGNED_SHARD)
                if off == 0 or self.shard is None:
                    rows = min(ALIGNED_SHARD, self.n - s * ALIGNED_SHARD)
                    shape = (rows, *self.size) if self.channels == 1 else (rows, *self.size, 3)
                    (self.tmp / "aligned").mkdir(exist_ok=True)
                    self.shard = np.lib.format.open_memmap(self.tmp / "aligned" / f"shard-{s:05d}.npy", mode="w+",
                                                           dtype=np.uint8, shape=shape)
                take = min(start + len(u8) - i, ALIGNED_SHARD - off)
                part = u8[i - start:i - start + take]
                self.shard[off:off + take] = part[:, 0] if self.channels == 1 else part.transpose(0, 2, 3, 1)
                i += take

    def close(self) -> None:
        if self.pool is not None:
            for fu in self.futures:
                fu.result()
            self.pool.shutdown()
        if self.shard is not None:
            self.shard.flush()
            self.shard = None


def _finish(tmp: Path, src: Source, work: _Work, in_from_out_norm: torch.Tensor, meta: dict,
            align: Callable | None, dev: torch.device, aligned_mode: str,
            report: Callable[[Progress], None], should_stop, t0: float, *, warps_are_aligned: bool = False,
            stages: dict | None = None, warnings: list[str] = (), fallback: torch.Tensor | None = None) -> dict:
    """Public transforms, aligned originals, metrics and the report for a fitted collection, a
    chunk at a time; returns the metrics as written to ``metrics.json``.

    ``align``: the trained aligner's ``(B, C, H, W) -> (B, 3, 3)``, for the self-consistency
    check (skipped when None); ``warps_are_aligned``: ``in_from_out_norm`` is ``align`` of the
    images (DPRC, apply), so the check aligns only its re-warped copies. Computed on ``dev``:
    float64 on a CPU (as before), float32 on a GPU. ``t0``: when the job started
    (``time.time()``), for its ``seconds``; ``stages``: the job's seconds by stage so far (this
    one's is added as ``writing``); ``warnings``: the fit's, said first; ``fallback``: ``(N,)``
    bool, the images whose learned warp was replaced by the initial one (None: not checked).
    """
    t_finish = time.time()
    N, C = src.n, work.x.shape[1]
    wsize = work.size
    small = N <= SMALL_JOB_MAX
    mode = aligned_mode if aligned_mode != "auto" else ("png" if small else "none")
    dt = torch.float64 if dev.type == "cpu" else torch.float32
    names_all = src.names() if small or mode == "png" else None
    files = aligned_file_names(names_all) if names_all is not None else None
    writer = _Writer(tmp, mode, N, wsize, C) if mode != "none" else None
    transforms = np.lib.format.open_memmap(tmp / "transforms.npy", mode="w+", dtype=np.float64, shape=(N, 3, 3))
    per = np.zeros(N, dtype=per_image_dtype(C))
    per["touches_edge"] = -1  # -1: not checked (also for fallback)
    per["fallback"] = -1
    per["consistency_px"] = np.nan
    sizes = src.sizes()
    per["input_size"] = sizes
    per["fill"] = work.bg * 255.0
    sum_b = torch.zeros(C, *wsize, dtype=torch.float64)
    sq_b, sum_a, sq_a = torch.zeros_like(sum_b), torch.zeros_like(sum_b), torch.zeros_like(sum_b)
    cache: list[torch.Tensor] | None = [] if N * C * wsize[0] * wsize[1] * 4 <= 1024**3 else None
    chunk = _chunk_for(wsize, C, 32 * 1024**2)
    moved_all = torch.full((N,), float("nan"))
    probe_all = torch.full((N,), float("nan"))
    contact_all, plain_all = torch.zeros(N), torch.zeros(N, dtype=torch.bool)
    kept_all, area_all = torch.zeros(N), torch.zeros(N)

    # Arrays already at the working size: the originals are the working images.
    uniform = src.uniform_size is not None and tuple(src.uniform_size) == tuple(wsize)

    def aligned_chunk(k: int, images, work_from_out: torch.Tensor, orig_from_out: torch.Tensor) -> torch.Tensor:
        """Aligned images ``(k, C, H, W)`` in [0, 1], resampled from the originals."""
        fill = torch.from_numpy(work.bg[k:k + len(work_from_out)]).to(dev, dt)[..., None, None]
        if uniform:  # resample the working images on the device
            x = _rows(work.x, k, len(work_from_out)).to(dev).to(dt) / 255
            return (G.warp_pixel(x - fill, work_from_out.to(dev, dt), wsize) + fill).clamp(0, 1)
        out = torch.empty(len(images), C, *wsize, dtype=dt, device=dev)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape[:2], []).append(i)
        for _, idx in groups.items():
            ims = np.stack([_channels(images[i], C) for i in idx]).astype(np.float32) / 255.0
            t = torch.from_numpy(ims[:, None] if C == 1 else ims.transpose(0, 3, 1, 2)).to(dev, dt)
            f = fill[idx]
            out[idx] = (G.warp_pixel(t - f, orig_from_out[idx].to(dev, dt), wsize) + f).clamp(0, 1)
        return out

    source_chunks = None if uniform else src.chunks(chunk)
    seed = 0
    for k in range(0, N, chunk):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled")
        n = min(chunk, N - k)
        images = None if uniform else next(source_chunks)[1]
        Mn = in_from_out_norm[k:k + n].double().cpu()
        work_from_out = G.pixel_from_normalised(Mn, wsize, wsize)
        orig_from_out = G.original_from_resized(sizes[k:k + n], wsize) @ work_from_out
        orig_from_out = orig_from_out / orig_from_out[:, 2:3, 2:3]
        transforms[k:k + n] = orig_from_out.numpy()
        a = aligned_chunk(k, images, work_from_out, orig_from_out)
        x = _rows(work.x, k, n).to(dev).to(dt) / 255
        bg = torch.from_numpy(work.bg[k:k + n]).to(dev, dt)[..., None, None]
        sum_b += x.sum(0).cpu().double()
        sq_b += x.square().sum(0).cpu().double()
        sum_a += a.sum(0).cpu().double()
        sq_a += a.square().sum(0).cpu().double()
        kept, area = M.framing(x, work_from_out.to(dev, dt), wsize, bg)
        contact, plain = M.edge_contact(x, bg)
        kept_all[k:k + n], area_all[k:k + n] = kept.float().cpu(), area.float().cpu()
        contact_all[k:k + n], plain_all[k:k + n] = contact.float().cpu(), plain.cpu()
        if align is not None:
            with torch.no_grad():
                moved, probe = M.self_consistency(lambda b: align(b.float()), x, bg, sigma=M.CONSISTENCY_SIGMA,
                                                  seed=seed, warps=Mn if warps_are_aligned else None,
                                                  chunk=n if dev.type == "cuda" else 512)
            moved_all[k:k + n], probe_all[k:k + n] = moved.float(), probe.float()
        seed += 1
        if writer is not None:
            u8 = (a * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
            writer.write(k, files[k:k + n] if files is not None else None, u8)
        if cache is not None:
            cache.append(a.float().cpu())
        report(Progress("writing", step=k + n, total=N, message="aligning and writing outputs"))
    if writer is not None:
        writer.close()
    transforms.flush()
    del transforms

    mb, ma = sum_b / N, sum_a / N
    vb, va = (sq_b / N - mb.square()).clamp_min(0), (sq_a / N - ma.square()).clamp_min(0)
    # Per-image residual to the aligned mean: a second pass (over the kept chunks, or recomputed).
    resid = torch.zeros(N)
    mean_dev = ma.to(dev, dt)
    source_chunks = None if uniform else src.chunks(chunk)
    for i, k in enumerate(range(0, N, chunk)):
        n = min(chunk, N - k)
        if cache is not None:
            a = cache[i].to(dev, dt)
        else:
            images = None if uniform else next(source_chunks)[1]
            work_from_out = G.pixel_from_normalised(in_from_out_norm[k:k + n].double().cpu(), wsize, wsize)
            orig_from_out = G.original_from_resized(sizes[k:k + n], wsize) @ work_from_out
            a = aligned_chunk(k, images, work_from_out, orig_from_out / orig_from_out[:, 2:3, 2:3])
        resid[k:k + n] = ((a - mean_dev) * 255.0).abs().mean(dim=(1, 2, 3)).float().cpu()
    if N < 2:
        resid.zero_()
    flags = M.flag_outliers(resid) if N > 2 else torch.zeros(N, dtype=torch.bool)
    touching = contact_all >= M.EDGE_CONTACT_MIN if N and float(plain_all.double().mean()) >= 0.5 else None
    moved = None if align is None else moved_all
    probe = None if align is None else probe_all

    vmax = max(float(vb.max()), float(va.max()), 1e-12)
    for name, img in (("mean_before", mb), ("mean_after", ma)):
        save_png(tmp / f"{name}.png", _hwc(img.float().numpy()))
    for name, img in (("var_before", vb), ("var_after", va)):
        save_png(tmp / f"{name}.png", _hwc((img / vmax).float().numpy()))

    per["residual"], per["outlier"] = resid.numpy(), flags.numpy()
    per["content_kept"], per["area_scale"] = kept_all.numpy(), area_all.numpy()
    per["edge_contact"] = contact_all.numpy()
    if touching is not None:
        per["touches_edge"] = touching.numpy().astype(np.int8)
    if moved is not None:
        per["consistency_px"] = moved.numpy()
    if fallback is not None:
        per["fallback"] = fallback.numpy().astype(np.int8)
    np.save(tmp / "per_image.npy", per, allow_pickle=False)
    _write_names(tmp, src, chunk)

    out_size = list(wsize)
    arrays = {"matrix": "transforms.npy", "names": "names.txt", "per_image": "per_image.npy"}
    head = {"convention": CONVENTION, "output_size": out_size, "method": meta["method"], "warp": meta["warp"],
            "reference": meta.get("reference"), "n_images": N, "arrays": arrays,
            "aligned": {"png": "aligned/<name>.png", "npy": f"aligned/shard-NNNNN.npy ({ALIGNED_SHARD} a shard)",
                        "none": None}[mode]}
    if small:
        mats = np.load(tmp / "transforms.npy")
        head["images"] = [
            {"name": nm, "aligned_file": f if mode == "png" else None, "input_size": [int(v) for v in sizes[i]],
             "matrix": mats[i].tolist(),
             "fill": [round(float(v) * 255.0, 4) for v in work.bg[i]]}
            for i, (nm, f) in enumerate(zip(names_all, files if files is not None else [None] * N))]
    (tmp / "transforms.json").write_text(json.dumps(head, indent=1))
    finite = lambda v: None if v is None or not math.isfinite(v) else round(v, 4)  # noqa: E731
    a_before = _apsnr(sq_b, mb, N) if N > 1 else None
    a_after = _apsnr(sq_a, ma, N) if N > 1 else None
    object_ratio, object_sample = None, 0
    if align is not None and N:
        idx = M.evenly_spaced(N, M.CONSISTENCY_SAMPLE)
        xs = torch.from_numpy(np.array(work.x[idx.numpy()])).to(dev)
        bs = torch.from_numpy(np.array(work.bg[idx.numpy()])).to(dev, torch.float32)[..., None, None]
        mo, po = M.sampled_self_consistency(lambda b: align(b.float()), xs,
                                            in_from_out_norm[idx] if warps_are_aligned else None, len(idx),
                                            bg=bs, sigma=M.CONSISTENCY_SIGMA, chunk=4096 if dev.type == "cuda" else 512)
        object_ratio, object_sample = M.consistency_ratio(mo, po), len(idx)
    consistency = _consistency_summary(moved, probe, object_ratio, object_sample)
    n_lost = int(M.lost_images(kept_all, area_all).sum())
    n_fallback = None if fallback is None else int(fallback.sum())
    metrics = {
        **meta,
        "n_images": N,
        "output_size": out_size,
        "arrays": arrays,
        "apsnr_before": finite(a_before),
        "apsnr_after": finite(a_after),
        "apsnr_note": "Eq. 9 on 0-255 intensities; null when undefined (one image) or infinite (identical images)",
        "variance_png_scale": vmax,
        "residual_summary": {
            "mean": float(resid.mean()) if N else 0.0,
            "median": float(resid.median()) if N else 0.0,
            "p95": float(torch.quantile(resid, 0.95)) if N else 0.0,
            "max": float(resid.max()) if N else 0.0,
            "n_outliers": int(flags.sum()),
        },
        "framing_summary": {
            "content_kept_median": round(float(kept_all.median()), 4) if N else None,
            "content_kept_p10": round(float(torch.quantile(kept_all.double(), 0.1)), 4) if N else None,
            "area_scale_median": round(float(area_all.median()), 4) if N else None,
            "n_cropped": int((kept_all < KEPT_WARN).sum()),
            "n_lost": n_lost,
            "n_fallback": n_fallback,
            "n_touching_edge": None if touching is None else int(touching.sum()),
        },
        "consistency_summary": consistency,
        "warnings": _fallback_warnings(n_fallback or 0, N)
        + _framing_warnings(kept_all, area_all) + _lost_warnings(n_lost, N)
        + _edge_warnings(touching) + _consistency_warnings(consistency),
    }
    if small:
        metrics["per_image"] = [
            {"name": nm, "residual": round(float(per["residual"][i]), 4), "outlier": bool(per["outlier"][i]),
             "content_kept": round(float(per["content_kept"][i]), 4),
             "area_scale": round(float(per["area_scale"][i]), 4),
             "edge_contact": round(float(per["edge_contact"][i]), 4),
             "touches_edge": None if touching is None else bool(touching[i]),
             **({} if fallback is None else {"fallback": bool(fallback[i])}),
             **({} if moved is None else {"consistency_px": round(float(moved[i]), 4)})}
            for i, nm in enumerate(names_all)]
    metrics["warnings"] = list(warnings) + metrics["warnings"]
    metrics["seconds"] = round(time.time() - t0, 3)
    if stages is not None:
        metrics["stage_seconds"] = {**stages, "writing": round(time.time() - t_finish, 3)}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    R.write_report(tmp, metrics, _report_sample(src, work, in_from_out_norm, per))
    return metrics


def _report_sample(src: Source, work: _Work, in_from_out_norm: torch.Tensor, per: np.ndarray) -> R.Sample:
    """The report's contact sheet (:func:`models.report.sample_indices`: a few dozen images whatever
    the job's size): inputs at the working size and their aligned images, resampled here from the
    working set with the job's warps (the published aligned images are resampled from the originals)."""
    idx = R.sample_indices(per["residual"])
    x = torch.from_numpy(np.asarray(work.x[idx - work.start])).double() / 255  # (k, C, H, W)
    fill = torch.from_numpy(work.bg[idx - work.start]).double()[..., None, None]  # (k, C, 1, 1)
    work_from_out = G.pixel_from_normalised(in_from_out_norm[torch.from_numpy(idx)].double().cpu(), work.size, work.size)
    a = (G.warp_pixel(x - fill, work_from_out, work.size) + fill).clamp(0, 1)

    def u8(t: torch.Tensor) -> np.ndarray:  # (k, C, H, W) in [0, 1] -> (k, H, W[, 3]) uint8
        v = (t * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
        return v[:, 0] if v.shape[1] == 1 else v.transpose(0, 2, 3, 1)

    touching = per["touches_edge"][idx]
    return R.Sample(index=idx, names=[src.names(int(i), int(i) + 1)[0] for i in idx], inputs=u8(x), aligned=u8(a),
                    residual=per["residual"][idx], outlier=per["outlier"][idx], content_kept=per["content_kept"][idx],
                    cropped=per["content_kept"][idx] < KEPT_WARN, touches_edge=None if (touching < 0).all() else touching)


def _apsnr(sq: torch.Tensor, mean: torch.Tensor, n: int) -> float:
    """Eq. 9 from per-pixel sums: ``MSE = mean_pixels(E[x^2] - E[x]^2)`` on 0-255 intensities."""
    mse = float((sq / n - mean.square()).clamp_min(0).mean()) * 255.0**2
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _write_names(tmp: Path, src: Source, chunk: int) -> None:
    """``names.txt`` (one a line) and ``names.idx.npy`` (each line's byte offset, then the size)."""
    offsets = np.empty(src.n + 1, dtype=np.int64)
    pos = 0
    with open(tmp / "names.txt", "wb") as f:
        for k in range(0, src.n, chunk):
            for i, nm in enumerate(src.names(k, min(src.n, k + chunk))):
                b = nm.encode("utf-8") + b"\n"
                offsets[k + i] = pos
                f.write(b)
                pos += len(b)
    offsets[src.n] = pos
    np.save(tmp / "names.idx.npy", offsets, allow_pickle=False)
