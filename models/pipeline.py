"""End-to-end jobs: read a collection, fit a method, write every output.

This is what the CLI and the Celery worker call. Output folder layout::

    OUT/
      aligned/<name>.png        aligned images (output frame = working size)
      transforms.json           per image: name, 3x3 matrix, fill; convention stated
      metrics.json              APSNR before/after, counts, seconds, per-image residual
      mean_before.png  var_before.png  mean_after.png  var_after.png
      model/                    trained aligner (config.json + *.safetensors), if any

Everything is written to a temporary sibling folder and renamed into place at
the end, so a folder named OUT is always complete.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import geometry as G
from . import metrics as M
from .imageops import background
from .imageio import Collection, InputError, LoadLimits, load_collection, resize_to, save_png, working_size
from .methods import Cancelled, FitContext, Progress, create_method, load_aligner

__all__ = [
    "AlignOptions",
    "AlignReport",
    "CONVENTION",
    "resolve_device",
    "prepare",
    "align_collection",
    "apply_model",
    "aligned_file_names",
    "Cancelled",
    "InputError",
]

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


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> first CUDA device if any, else CPU; otherwise as given."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine")
    return dev


def prepare(col: Collection, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Resize every image to ``size`` and stack, ``(N, C, H, W)`` float32 in [0, 1]."""
    out = np.empty((len(col), channels, *size), dtype=np.float32)
    for i, im in enumerate(col.images):
        a = resize_to(_channels(im, channels), size)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _channels(im: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3 and im.ndim == 2:
        return np.repeat(im[..., None], 3, axis=2)
    if channels == 1 and im.ndim == 3:
        return np.round(im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return im


def aligned_file_names(names: list[str]) -> list[str]:
    """``aligned/<name with its extension replaced by .png>``; ``<name>.png`` where that collides."""
    stems = [str(Path(n).with_suffix(".png")) for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return ["aligned/" + (s if counts[s] == 1 else n + ".png") for s, n in zip(stems, names)]


def _orig_from_work(orig_size: tuple[int, int], work_size: tuple[int, int]) -> torch.Tensor:
    """Pixel map from a resized (working) image back to its original, for Pillow's resize geometry."""
    sy, sx = orig_size[0] / work_size[0], orig_size[1] / work_size[1]
    return torch.tensor([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]], dtype=torch.float64)


def _resample_originals(col: Collection, channels: int, orig_from_out: torch.Tensor,
                        out_size: tuple[int, int], fill: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Warp each original image with its public transform. Returns ``(N, C, Ho, Wo)`` in [0, 1]."""
    N = len(col)
    out = torch.empty(N, channels, *out_size)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(col.sizes):
        groups.setdefault(s, []).append(i)
    for _, idx in groups.items():
        for k in range(0, len(idx), chunk):
            sel = idx[k:k + chunk]
            imgs = np.stack([_channels(col.images[i], channels) for i in sel]).astype(np.float32) / 255.0
            t = torch.from_numpy(imgs[:, None] if channels == 1 else imgs.transpose(0, 3, 1, 2)).double()
            f = fill[sel].double()[..., None, None]
            w = G.warp_pixel(t - f, orig_from_out[sel], out_size) + f
            out[sel] = w.clamp(0, 1).float()
    return out


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
                   "in consistency (docs/benchmarks.md)")
    if len(area) and float(area.median()) > AREA_WARN:
        out.append(f"the aligned frames show the objects at 1/{float(area.median()):.1f} of their area: "
                   "the alignment shrinks them")
    return out


def _edge_warnings(touching: torch.Tensor | None) -> list[str]:
    if touching is None or len(touching) == 0 or float(touching.double().mean()) < 0.5:
        return []
    return [f"{int(touching.sum())} of {len(touching)} images have their object touching the image border: "
            "part of each may lie outside its image, and two images cut differently cannot be aligned "
            "consistently (per_image[].touches_edge lists them; docs/benchmarks.md, \"Objects cut by the border\")"]


# Self-consistency probe: each image re-warped by a known random perturbation of this size (a
# fraction of the side, the benchmark's protocol) and aligned again. Above the warning ratio the
# aligned frame follows the probe more than half as much as an aligner that ignores the image;
# trained aligners measured 0.31, 0.38 and 0.69 on it, and the one at 0.69 ended worse than not
# aligning against ground truth (docs/benchmarks.md, "Self-consistency").
CONSISTENCY_SIGMA, CONSISTENCY_WARN = 0.1, 0.5


def _consistency_summary(moved: torch.Tensor | None, probe: torch.Tensor | None) -> dict | None:
    if moved is None or len(moved) == 0:
        return None
    return {
        "probe_sigma": CONSISTENCY_SIGMA,
        "moved_median_px": round(float(moved.median()), 4),
        "probe_median_px": round(float(probe.median()), 4),
        "ratio": round(M.consistency_ratio(moved, probe), 4),
    }


def _consistency_warnings(s: dict | None) -> list[str]:
    if s is None or s["ratio"] <= CONSISTENCY_WARN:
        return []
    return [f"the aligner is not self-consistent: re-warping each image by a known {CONSISTENCY_SIGMA:.0%} "
            f"perturbation moves its aligned frame {s['ratio']:.2f} as far as the perturbation itself "
            f"(> {CONSISTENCY_WARN}); expect two views of one object to be aligned differently"]


def _write_outputs(tmp: Path, col: Collection, aligned: torch.Tensor, before: torch.Tensor,
                   orig_from_out: torch.Tensor, fill: torch.Tensor, meta: dict,
                   kept: torch.Tensor, area: torch.Tensor, contact: torch.Tensor,
                   touching: torch.Tensor | None, moved: torch.Tensor | None = None,
                   probe: torch.Tensor | None = None) -> dict:
    """Write images, transforms.json and metrics.json into ``tmp``; returns the metrics dict.

    ``touching``: per-image border flags, or None where the collection's borders are not plain
    (the check is off).
    """
    out_size = tuple(aligned.shape[-2:])
    files = aligned_file_names(col.names)
    for f, img in zip(files, aligned):
        save_png(tmp / f, _hwc(img))
    resid = M.per_image_residual(aligned) if len(col) > 1 else torch.zeros(len(col))
    flags = M.flag_outliers(resid) if len(col) > 2 else torch.zeros(len(col), dtype=torch.bool)
    mb, vb = M.mean_var(before)
    ma, va = M.mean_var(aligned)
    vmax = max(float(vb.max()), float(va.max()), 1e-12)
    for name, img in (("mean_before", mb), ("mean_after", ma)):
        save_png(tmp / f"{name}.png", _hwc(img))
    for name, img in (("var_before", vb), ("var_after", va)):
        save_png(tmp / f"{name}.png", _hwc(img / vmax))
    transforms = {
        "convention": CONVENTION,
        "output_size": list(out_size),
        "method": meta["method"],
        "warp": meta["warp"],
        "reference": meta.get("reference"),
        "images": [
            {
                "name": n,
                "aligned_file": f,
                "input_size": list(s),
                "matrix": orig_from_out[i].tolist(),
                "fill": [round(float(v) * 255.0, 4) for v in fill[i]],
            }
            for i, (n, f, s) in enumerate(zip(col.names, files, col.sizes))
        ],
    }
    (tmp / "transforms.json").write_text(json.dumps(transforms, indent=1))
    finite = lambda v: None if v is None or not math.isfinite(v) else round(v, 4)  # noqa: E731
    a_before = M.apsnr(before) if len(col) > 1 else None
    a_after = M.apsnr(aligned) if len(col) > 1 else None
    consistency = _consistency_summary(moved, probe)
    metrics = {
        **meta,
        "n_images": len(col),
        "output_size": list(out_size),
        "apsnr_before": finite(a_before),
        "apsnr_after": finite(a_after),
        "apsnr_note": "Eq. 9 on 0-255 intensities; null when undefined (one image) or infinite (identical images)",
        "variance_png_scale": vmax,
        "residual_summary": {
            "mean": float(resid.mean()) if len(col) else 0.0,
            "median": float(resid.median()) if len(col) else 0.0,
            "p95": float(torch.quantile(resid, 0.95)) if len(col) else 0.0,
            "max": float(resid.max()) if len(col) else 0.0,
            "n_outliers": int(flags.sum()),
        },
        "framing_summary": {
            "content_kept_median": round(float(kept.median()), 4) if len(col) else None,
            "content_kept_p10": round(float(torch.quantile(kept.double(), 0.1)), 4) if len(col) else None,
            "area_scale_median": round(float(area.median()), 4) if len(col) else None,
            "n_cropped": int((kept < KEPT_WARN).sum()),
            "n_touching_edge": None if touching is None else int(touching.sum()),
        },
        "consistency_summary": consistency,
        "warnings": _framing_warnings(kept, area) + _edge_warnings(touching) + _consistency_warnings(consistency),
        "per_image": [
            {"name": n, "residual": round(float(r), 4), "outlier": bool(o),
             "content_kept": round(float(k), 4), "area_scale": round(float(a), 4),
             "edge_contact": round(float(c), 4), "touches_edge": None if touching is None else bool(touching[i])}
            for i, (n, r, o, k, a, c) in enumerate(zip(col.names, resid, flags, kept, area, contact))
        ],
    }
    if moved is not None:
        for e, m_ in zip(metrics["per_image"], moved):
            e["consistency_px"] = round(float(m_), 4)
    return metrics


def _hwc(img: torch.Tensor) -> np.ndarray:
    a = img.detach().cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


class _Staging:
    """Write into ``OUT.tmp-<id>`` and rename to ``OUT`` on success."""

    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir = out_dir
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise InputError(f"{out_dir}: output folder exists and is not empty (use --overwrite)")
        self.tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _load(source, limits: LoadLimits) -> Collection:
    return source if isinstance(source, Collection) else load_collection(source, limits)


def align_collection(source: str | os.PathLike | Collection, out_dir: str | os.PathLike,
                     options: AlignOptions = AlignOptions(), *,
                     progress: Callable[[Progress], None] | None = None,
                     checkpoint_dir: str | os.PathLike | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     limits: LoadLimits = LoadLimits(), overwrite: bool = False) -> AlignReport:
    """Congeal a collection and write the output folder (layout in the module docstring).

    Raises:
        InputError: unreadable/empty input, fewer than 2 images, unknown reference.
        Cancelled: ``should_stop()`` became true.
    """
    t0 = time.time()
    report = progress or (lambda p: None)
    report(Progress("loading", message="reading images"))
    col = _load(source, limits)
    if len(col) < 2:
        raise InputError(f"{len(col)} image(s): congealing needs at least 2 images")
    G.get_family(options.warp)
    ref_index = None
    if options.reference is not None:
        if options.reference not in col.names:
            raise InputError(f"reference {options.reference!r} is not one of the collection's image names")
        ref_index = col.names.index(options.reference)
    device = resolve_device(options.device)
    channels = col.channels
    wsize = working_size(col.sizes, options.max_side)
    work = prepare(col, wsize, channels)  # (N, C, H, W)
    method = create_method(options.method, **options.method_options)
    ctx = FitContext(
        warp=options.warp, reference_index=ref_index, seed=options.seed, budget=options.budget,
        progress=report, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        should_stop=should_stop,
    )
    result = method.fit(work.to(device), ctx)
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled")
    report(Progress("writing", message="writing outputs"))
    ref_name = col.names[result.reference_index] if result.reference_index is not None else None
    meta = {
        "method": options.method, "warp": options.warp, "reference": ref_name,
        "device": str(device), "working_size": list(wsize), "channels": channels,
        "seed": options.seed, "options": {k: v for k, v in asdict(options).items() if k != "device"},
        "history": result.history[-200:], "notes": result.notes,
    }
    out_dir = Path(out_dir)
    with _Staging(out_dir, overwrite) as tmp:
        model_dir = None
        if result.aligner is not None:
            result.aligner.save(tmp / "model")
            (tmp / "model" / "pipeline.json").write_text(json.dumps(
                {"working_size": list(wsize), "channels": channels, "warp": options.warp,
                 "method": options.method, "max_side": options.max_side}, indent=1))
            model_dir = str(out_dir / "model")
        align = None if result.aligner is None else (lambda b: result.aligner.align(b.to(device)))
        metrics = _finish(tmp, col, work, result.in_from_out_norm, wsize, meta, align)
        metrics["seconds"] = round(time.time() - t0, 3)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report(Progress("done", apsnr=metrics["apsnr_after"]))
    return AlignReport(str(out_dir), len(col), metrics["apsnr_before"], metrics["apsnr_after"],
                       metrics["seconds"], options.method, options.warp, ref_name, model_dir,
                       metrics["residual_summary"]["n_outliers"], metrics["warnings"])


def _finish(tmp: Path, col: Collection, work: torch.Tensor, in_from_out_norm: torch.Tensor,
            wsize: tuple[int, int], meta: dict, align: Callable | None = None) -> dict:
    """Public transforms, aligned originals and metrics for a fitted collection.

    ``align``: the trained aligner's ``(B, C, H, W) -> (B, 3, 3)``, for the
    self-consistency check (skipped when None).
    """
    work_from_out = G.pixel_from_normalised(in_from_out_norm.detach().double().cpu(), wsize, wsize)
    orig_from_out = torch.stack([_orig_from_work(s, wsize) for s in col.sizes]) @ work_from_out
    orig_from_out = orig_from_out / orig_from_out[:, 2:3, 2:3]
    bg = background(work)
    fill = bg[..., 0, 0]  # (N, C)
    aligned = _resample_originals(col, work.shape[1], orig_from_out, wsize, fill)
    # Judged in the working frame, where the aligner's warps live.
    kept, area = M.framing(work.double(), work_from_out, wsize, bg.double())
    # Border contact says "cut by the border" only where borders are background; on collections
    # whose content fills the frame (most images' borders not plain) the flags are left out.
    contact, plain = M.edge_contact(work.double(), bg.double())
    touching = contact >= M.EDGE_CONTACT_MIN if len(col) and float(plain.double().mean()) >= 0.5 else None
    moved = probe = None
    if align is not None and len(col) > 0:
        with torch.no_grad():
            moved, probe = M.self_consistency(align, work, bg, sigma=CONSISTENCY_SIGMA)
    return _write_outputs(tmp, col, aligned, work, orig_from_out, fill, meta, kept.float(), area.float(),
                          contact.float(), touching, moved, probe)


def apply_model(model_dir: str | os.PathLike, source: str | os.PathLike | Collection,
                out_dir: str | os.PathLike, *, device: str = "auto",
                progress: Callable[[Progress], None] | None = None,
                limits: LoadLimits = LoadLimits(), overwrite: bool = False,
                batch_size: int = 256) -> AlignReport:
    """Align new images with a trained aligner in one forward pass (no re-fitting).

    Writes the same layout as :func:`align_collection` minus ``model/``.
    """
    t0 = time.time()
    report = progress or (lambda p: None)
    model_dir = Path(model_dir)
    pj = model_dir / "pipeline.json"
    if not pj.is_file():
        raise InputError(f"{model_dir}: not a trained model folder (no pipeline.json)")
    pipe = json.loads(pj.read_text())
    dev = resolve_device(device)
    aligner = load_aligner(model_dir, dev)
    report(Progress("loading", message="reading images"))
    col = _load(source, limits)
    wsize = tuple(pipe["working_size"])
    channels = int(pipe["channels"])
    work = prepare(col, wsize, channels)
    report(Progress("aligning", total=len(col)))
    warps = []
    with torch.no_grad():
        for k in range(0, len(col), batch_size):
            warps.append(aligner.align(work[k:k + batch_size].to(dev)).float().cpu())
            report(Progress("aligning", step=min(k + batch_size, len(col)), total=len(col)))
    meta = {"method": pipe["method"], "warp": pipe["warp"], "reference": None, "device": str(dev),
            "working_size": list(wsize), "channels": channels, "model_dir": str(model_dir)}
    out_dir = Path(out_dir)
    with _Staging(out_dir, overwrite) as tmp:
        metrics = _finish(tmp, col, work, torch.cat(warps), wsize, meta, lambda b: aligner.align(b.to(dev)))
        metrics["seconds"] = round(time.time() - t0, 3)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report(Progress("done"))
    return AlignReport(str(out_dir), len(col), metrics["apsnr_before"], metrics["apsnr_after"],
                       metrics["seconds"], pipe["method"], pipe["warp"], None, None,
                       metrics["residual_summary"]["n_outliers"], metrics["warnings"])
