"""Score warps saved by ``bench/sweep.py --save-warps`` again, with today's measures.

Each file ``warps_d<D>_s<S>_c<K>.pt`` holds the ``(2N, 3, 3)`` normalised warps of one run on
the benchmark's pairs for digit D at sigma S; the pairs are rebuilt (same seed rule) and scored
with :func:`models.evaluate.evaluate_warps`, so rows measured before a measure existed (the
object residual, seventh session) get it. One JSON line per file, the ``bench/sweep.py`` format
without the fit's seconds and notes; ``--visible`` adds the same measures on the pairs whose two
copies both still show at least that share of their digit.

    python docs/research/diagnoses/rescore_warps.py bench/results/warps/defaults_s20 --visible 0.9 --out rows.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # baselines_common, protocol_visibility
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import baselines_common as BC  # noqa: E402
import torch  # noqa: E402
from protocol_visibility import pair_visibility  # noqa: E402

from models.evaluate import evaluate_warps  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--n", type=int, default=500, help="sources per digit the runs used")
    ap.add_argument("--visible", type=float, default=None,
                    help="also score the pairs whose copies both show at least this share of the digit")
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    args = ap.parse_args()
    for folder in args.folders:
        for f in sorted(Path(folder).glob("warps_*.pt")):
            m = BC.WARPS_NAME.search(f.name)
            if not m:
                continue
            d, s, k = int(m[1]), float(m[2]), int(m[3])
            pairs = BC.pairs_for(d, s, args.n)
            warps = torch.load(f)
            row = {"digit": d, "sigma": s, "warps": str(f), "config_index": k, **evaluate_warps(pairs, warps).to_dict()}
            rows = [row]
            if args.visible is not None:
                keep = torch.nonzero(pair_visibility(pairs.sources, pairs) >= args.visible)[:, 0]
                if len(keep):
                    N = pairs.n_sources
                    sub = torch.cat([warps[keep], warps[N + keep]])
                    rows.append({"digit": d, "sigma": s, "warps": str(f), "config_index": k,
                                 "visible_at_least": args.visible, "n_pairs": len(keep),
                                 **evaluate_warps(pairs.select(keep), sub).to_dict()})
            BC.emit_rows(rows, args.out)


if __name__ == "__main__":
    main()
