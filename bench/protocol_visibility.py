"""How much of each source digit the perturbation protocol leaves inside the 28 px frame.

The protocol (models.perturb) moves the frame's corners by N(0, (sigma s)^2) plus a common
translation; content pushed outside is lost. For each pair (two copies of one source) we take the
share of the source's foreground mass the *less* visible copy still shows: no aligner can make two
copies agree on what one of them no longer contains. No fitting; pure protocol.

    python bench/protocol_visibility.py --sigmas 0.1,0.2,0.3 --out bench/results/protocol_visibility.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines_common as BC  # noqa: E402
import torch  # noqa: E402

from models import metrics as M  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.perturb import PairedSet  # noqa: E402


def copy_visibility(src: torch.Tensor, pairs: PairedSet) -> torch.Tensor:
    """``(2N,)`` share of each source ``(N, C, H, W)`` that each copy in ``pairs`` shows."""
    return M.content_kept(torch.cat([src, src]).double(), pairs.src_from_input, tuple(src.shape[-2:]))


def pair_visibility(src: torch.Tensor, pairs: PairedSet) -> torch.Tensor:
    """``(N,)`` share of each source ``(N, C, H, W)`` that the less visible of its two copies in ``pairs`` shows."""
    vis = copy_visibility(src, pairs)
    return torch.minimum(vis[:pairs.n_sources], vis[pairs.n_sources:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--sigmas", default="0.1,0.2,0.3")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print("| σ | median share shown by the less visible copy | pairs with both ≥ 90 % | both ≥ 99 % |")
    print("|---|---|---|---|")
    for s in [float(v) for v in args.sigmas.split(",")]:
        allv = []
        for d in [int(v) for v in args.digits.split(",")]:
            v = pair_visibility(mnist_digits(d, args.n), BC.pairs_for(d, s, args.n))
            allv.append(v)
            rows.append({"digit": d, "sigma": s, "median": round(float(v.median()), 4),
                         "both_ge_0.9": round(float((v >= 0.9).double().mean()), 4),
                         "both_ge_0.99": round(float((v >= 0.99).double().mean()), 4)})
        v = torch.cat(allv)
        print(f"| {s:.0%} | {v.median():.2f} | {(v >= 0.9).double().mean():.0%} | {(v >= 0.99).double().mean():.0%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python bench/protocol_visibility.py " + " ".join(sys.argv[1:]),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
