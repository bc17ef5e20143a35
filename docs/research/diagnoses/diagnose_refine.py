"""Does per-image refinement against a common template make a trained DPRC fit more consistent?

The classical congealing polish: after the network's one-pass warps ``M_i``,
minimise for each image on its own ``|blur(warp(x_i, M_i H(d))) - blur(T)|``
over a correction ``H(d)`` (4-point corner offsets, restricted to a warp
family), coarse to fine, against one fixed template ``T`` (the median or mean
of the aligned images). Two copies of one source share that objective up to
resampling, so if its minimum were well defined they would converge to one
frame. Prints the pair-residual evaluation of the fit and of each variant.

    python docs/research/diagnoses/diagnose_refine.py --digit 3 --sigma 0.1 \
        --options '{"width": 1, "batch_size": 64, "preset": "small"}' \
        --variants '[{}, {"loss": "l2"}, {"template": "mean"}, {"rounds": 2}, {"lr": 0.002},
                     {"lr": 0.0005}, {"family": "affine"}, {"family": "similarity"},
                     {"family": "translation"}]' --out bench/results/cpu_refine_digit3.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # baselines_common, protocol_visibility
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import baselines_common as BC  # noqa: E402
from models import geometry as G  # noqa: E402
from models.evaluate import evaluate_warps, run_on_pairs  # noqa: E402
from models.imageops import background, blur  # noqa: E402


@dataclass
class Refine:
    sigmas: tuple = (1.5, 0.75, 0.0)  # blur per level, pixels, coarse to fine
    iters: int = 60  # Adam steps per level
    lr: float = 0.01  # normalised corner-offset units
    rounds: int = 1  # template re-estimated from the refined images this many times
    loss: str = "l1"
    template: str = "median"
    family: str = "homography"


def _correction(d: torch.Tensor, family: str) -> torch.Tensor:
    H = G.offsets_to_homography(d)
    return H if family == "homography" else G.params_to_matrix(G.matrix_to_params(H, family), family)


def refine(x: torch.Tensor, M0: torch.Tensor, r: Refine) -> torch.Tensor:
    """``(N, C, H, W)``, ``(N, 3, 3)`` in_from_out_norm -> refined ``(N, 3, 3)``."""
    size = tuple(x.shape[-2:])
    bg = background(x)
    M_ = M0.to(x)
    for _ in range(max(1, r.rounds)):
        with torch.no_grad():
            a = G.warp(x, M_, size, fill=bg)
            T = a.median(0, keepdim=True).values if r.template == "median" else a.mean(0, keepdim=True)
        d = torch.zeros(x.shape[0], 8, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.Adam([d], lr=r.lr)
        for s in r.sigmas:
            Tb = blur(T, s)
            for _ in range(r.iters):
                res = blur(G.warp(x, M_ @ _correction(d, r.family), size, fill=bg), s) - Tb
                per = (res.abs() if r.loss == "l1" else res.pow(2)).mean(dim=(1, 2, 3))
                opt.zero_grad(set_to_none=True)
                per.sum().backward()  # the images are independent: each gets its own gradient
                opt.step()
        with torch.no_grad():
            M_ = M_ @ _correction(d, r.family)
    return M_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--options", default="{}", help="DPRC options of the fit")
    ap.add_argument("--variants", default="[{}]", help="JSON list of Refine overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    opts = json.loads(args.options)
    pairs = BC.pairs_for(args.digit, args.sigma, args.n)
    ev, res = run_on_pairs(pairs, "dprc", options=opts)
    rows = [{"digit": args.digit, "sigma": args.sigma, "cfg": opts, "refine": None, **ev.to_dict()}]
    for v in json.loads(args.variants):
        r = Refine(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        t0 = time.time()
        Mr = refine(pairs.images, res.in_from_out_norm, r)
        evr = evaluate_warps(pairs, Mr)
        evr.seconds = time.time() - t0
        rows.append({"digit": args.digit, "sigma": args.sigma, "cfg": opts, "refine": v, **evr.to_dict()})
    BC.emit_rows(rows, args.out)


if __name__ == "__main__":
    main()
