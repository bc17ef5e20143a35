"""Where the mean pair residual comes from: fit DPRC on one paired collection and break the
per-pair residuals down (docs/research/quality-rounds-1-9.md, "Why the σ ≥ 20 % mean is carried by a tail").

For each pair it reports how much of the source digit each copy still shows (the protocol's
perturbation pushes content out of the 28 px frame) and how strongly the ground-truth
perturbation magnifies distances at the aligned frame's corners (a pixel of the input there is
this many pixels of the source: the pair residual is measured in source pixels).

    python docs/research/diagnoses/diagnose_tail.py --digit 9 --sigma 0.2 --configs '{"preset":"small","width":1,"batch_size":64}'

``--warps FILE`` scores warps saved by ``bench/sweep.py --save-warps`` (same digit, sigma and
``--n``) instead of fitting here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # baselines_common, protocol_visibility
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import baselines_common as BC  # noqa: E402
import torch  # noqa: E402
from protocol_visibility import pair_visibility  # noqa: E402

from models import geometry as G  # noqa: E402
from models import metrics as M  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.evaluate import evaluate_warps, run_on_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digit", type=int, default=9)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="{}", help="DPRCConfig overrides (JSON object)")
    ap.add_argument("--warps", default=None, help="saved in_from_out_norm warps to score instead of fitting")
    args = ap.parse_args()
    src = mnist_digits(args.digit, args.n)
    pairs = BC.pairs_for(args.digit, args.sigma, args.n)
    if args.warps:
        warps = torch.load(args.warps)
        ev = evaluate_warps(pairs, warps)
        print(json.dumps({"digit": args.digit, "sigma": args.sigma, "warps": args.warps, **ev.to_dict()}))
    else:
        ev, res = run_on_pairs(pairs, "dprc", device=args.device, options=json.loads(args.configs))
        warps = res.in_from_out_norm
        print(json.dumps({"digit": args.digit, "sigma": args.sigma, "cfg": json.loads(args.configs), **ev.to_dict(),
                          "notes": res.notes}))
    N, size = pairs.n_sources, tuple(pairs.images.shape[-2:])
    pix = G.pixel_from_normalised(warps.double(), size, size)
    Wab = pairs.src_from_input
    eye = torch.eye(3, dtype=torch.float64).expand(N, 3, 3)
    after = M.pair_residual(Wab[:N], Wab[N:], pix[:N], pix[N:], size)
    before = M.pair_residual(Wab[:N], Wab[N:], eye, eye, size)
    order = after.argsort(descending=True)
    top = order[: max(1, N // 20)]
    rest = order[max(1, N // 20):]
    q = torch.quantile(after, torch.tensor([0.5, 0.9, 0.95, 0.99], dtype=torch.float64))
    print(f"pair residual after: mean {after.mean():.2f}, quantiles 50/90/95/99 % "
          + " / ".join(f"{v:.1f}" for v in q.tolist()) + f" (before: mean {before.mean():.2f})")
    print(f"the worst 5 % of pairs ({len(top)}) carry {100 * after[top].sum() / after.sum():.0f} % of the mean")
    corners = G.transform_points(pix, G.corners(*size).double().expand(2 * N, 4, 2))
    mag = G.jacobian_determinant_at(Wab, corners).sqrt().amax(1)  # source px per input px, linear
    mag = torch.maximum(mag[:N], mag[N:])
    vis = pair_visibility(src, pairs)
    print(f"perturbation's magnification at the aligned corners (median): worst 5 % {mag[top].median():.1f}x, "
          f"other pairs {mag[rest].median():.1f}x")
    # How far the aligner itself sends the aligned frame's corners, in input frames (1 = the input's edge).
    unit = G.unit_corners(like=warps.double())
    reach = G.transform_points(warps.double(), unit.expand(2 * N, 4, 2))
    reach = reach.abs().amax(dim=(1, 2))
    reach = torch.maximum(reach[:N], reach[N:])
    print(f"aligner's reach, the farthest aligned corner in input half-widths (median): worst 5 % "
          f"{reach[top].median():.2f}, other pairs {reach[rest].median():.2f}; pairs beyond 3: "
          f"{int((reach[top] > 3).sum())} of the worst, {int((reach[rest] > 3).sum())} of the others")
    print(f"share of the source the less visible copy shows (median): worst 5 % {vis[top].median():.2f}, "
          f"other pairs {vis[rest].median():.2f}")
    for t in (0.5, 0.9, 0.99):
        m = vis >= t
        if m.any():
            print(f"pairs whose copies both show >= {t:.0%} of the source: {int(m.sum())} of {N}; ratio of means "
                  f"{after[m].mean() / before[m].mean():.3f}, of medians {after[m].median() / before[m].median():.3f}")


if __name__ == "__main__":
    main()
