"""The per-image fallback's tests on a good job's learned warps, and the fallback's effect on the truth.

Applies a job's saved DPRC model to its own collection (``bench/e2e_jobs.py``'s layout: the
collection with ``truth/``, the job's ``model/``) with the fallback off and on, and prints, over the
learned warps: where the frames' centres and corners land, the corners' smallest ``w``, the centre's
area scale against the moment start, how many frames each test would flag (a corner beyond 3
half-widths, the guard's test until the seventeenth session; ``metrics.stray_warps``), and the
ground-truth measures of both sets of warps::

    python bench/e2e_jobs.py --device cpu --sizes 1000 --work /tmp/e2e_cpu
    python docs/research/diagnoses/fallback_on_good_warps.py /tmp/e2e_cpu/c1000_cpu /tmp/e2e_cpu/o1000/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from models import geometry as G  # noqa: E402
from models import metrics as M  # noqa: E402
from models.catalog import load_aligner  # noqa: E402
from models.evaluate import evaluate_collection  # noqa: E402
from models.synth import open_collection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("collection")
    ap.add_argument("model")
    a = ap.parse_args()
    col = open_collection(a.collection)
    x = torch.from_numpy(np.asarray(col.images[0:len(col.images)]))
    x = (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).float() / 255
    al = load_aligner(Path(a.model), torch.device("cpu"))
    with torch.no_grad():
        start = al.base(x).double()
        learned = al._warps_from(x, al.base(x)).double()
        al.fallback = True
        replaced, flags = al.align_flagged(x)
    q, w = M.frame_corners(learned)
    q0 = learned[:, :2, 2] / learned[:, 2, 2, None]
    ratio = M.centre_scale(learned) / M.centre_scale(start)
    size = x.shape[-2:]
    out = {"n": len(x), "centre_max_abs": float(q0.abs().max()), "corner_max_abs": float(q.abs().max()),
           "corner_w_min": float(w.min()), "centre_scale_ratio": [float(ratio.min()), float(ratio.max())],
           "n_corner_beyond_3": int(((q.abs() > 3).any(2).any(1) | (w <= 0).any(1)).sum()),
           "n_stray": int(flags.sum())}
    corner = (q.abs() > 3).any(2).any(1) | (w <= 0).any(1)
    by_corner = torch.where(corner[:, None, None], start, learned)  # the corner test's replacement
    for name, W in (("learned", learned), ("with_fallback", replaced.double()), ("corner_replaced", by_corner)):
        pix = G.pixel_from_normalised(W, tuple(size), tuple(size)).numpy()  # the evaluation takes pixel matrices
        ev = evaluate_collection(col.images, col.src_from_input, pix, sources=col.sources, device="cpu").to_dict()
        out[name] = {k: ev[k] for k in ("object_residual_ratio", "residual_ratio", "content_kept")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
