"""How large an object the reference rule picks as the collection grows, and what the moment
initialisation then does to the frame (no training).

For each size, an infiMNIST-style collection (``models.synth``, made here if absent) is read,
DPRC's reference rule picks its image (the one closest to the blurred mean), and we report that
image's foreground RMS radius against the collection's median, and the moment initialisation's
framing (content kept, area scale at the centre) on the first 50,000 images, with that reference
and with a median-size one.

    python bench/reference_size.py --sizes 1000,6000,1000000 --out bench/results/session8/reference_size.jsonl
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import baselines_common as BC  # noqa: E402

from models import geometry as G  # noqa: E402
from models import metrics as M  # noqa: E402
from models import synth as Y  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.dprc import REFERENCE_SIZE_BAND, _moments, choose_reference, moment_init  # noqa: E402
from models.imageops import background  # noqa: E402


def _framing(x: torch.Tensor, ref: torch.Tensor) -> dict:
    rc, rr, _ = _moments(ref, background(ref))
    pix = G.pixel_from_normalised(moment_init(x, rc[0], rr[0]).double(), (28, 28), (28, 28))
    kept, area = M.framing(x.double(), pix, (28, 28), background(x).double())
    return {"content_kept_median": round(float(kept.median()), 4), "area_scale_median": round(float(area.median()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,6000,1000000")
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--work", default="/tmp/congeal-refsize")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bases = mnist_digits(a.digit)
    for n in BC.parse_list(a.sizes, int):
        t0 = time.time()
        col = Path(a.work) / f"c{n}"
        if not (col / "truth" / "meta.json").exists():
            Y.write_collection(col, bases, n, Y.SynthConfig(sigma=a.sigma))
        c = Y.open_collection(col)
        x = torch.from_numpy(np.concatenate([c.images[k:min(n, k + 65536)] for k in range(0, n, 65536)]))[:, None]
        x = x.to(a.device)
        ref = choose_reference(x)
        r = torch.cat([_moments(xf, background(xf))[1] for xf in
                       (x[k:k + 65536].float() / 255 for k in range(0, n, 65536))])
        med = r.median()
        sub = x[:50_000].float() / 255
        mid = int(torch.nonzero((r[:50_000] / med - 1).abs() < 0.02)[0])
        BC.emit_rows([{"n_images": n, "digit": a.digit, "sigma": a.sigma, "reference": ref,
                       "ref_radius_over_median": round(float(r[ref] / med), 4),
                       "ref_radius_percentile": round(float((r < r[ref]).double().mean()), 4),
                       "init_with_reference": _framing(sub, x[ref:ref + 1].float() / 255),
                       "init_with_median_size_image": _framing(sub, sub[mid:mid + 1]),
                       "size_band": REFERENCE_SIZE_BAND, "seconds": round(time.time() - t0, 1)}], a.out)


if __name__ == "__main__":
    main()
