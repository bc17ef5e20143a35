"""Run DPRC configurations on paired MNIST sets and print one JSON line each.

Used to find what makes the method robust (docs/research/quality-rounds-1-9.md, "What makes it
robust"). Every configuration runs on the same pairs.

    python bench/sweep.py --digits 3 --sigmas 0.1,0.3 --n 500 --device cuda \
        --configs '[{}, {"lam": 0}, {"init": "identity"}]'
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

from models.evaluate import evaluate_warps, run_on_pairs  # noqa: E402
from models.imageops import background  # noqa: E402
from models.metrics import consistency_ratio, self_consistency  # noqa: E402
from models.metrics import CONSISTENCY_SIGMA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", default="3")
    ap.add_argument("--sigmas", default="0.1")
    ap.add_argument("--n", type=int, default=500, help="sources per digit (each appears twice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warp", default="homography")
    ap.add_argument("--configs", default="[{}]", help="JSON list of DPRCConfig overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    ap.add_argument("--test-passes", default="",
                    help="also score the trained aligner with these numbers of DeSTNet passes, e.g. 2,3")
    ap.add_argument("--save-warps", default=None,
                    help="folder: save each run's in_from_out_norm warps (2N, 3, 3) as warps_d<D>_s<S>_c<K>.pt, "
                         "for docs/research/diagnoses/diagnose_tail.py --warps")
    args = ap.parse_args()
    configs = json.loads(args.configs)
    for d in [int(v) for v in args.digits.split(",")]:
        for s in [float(v) for v in args.sigmas.split(",")]:
            pairs = BC.pairs_for(d, s, args.n)
            for ci, cfg in enumerate(configs):
                cfg = dict(cfg)
                warp = cfg.pop("warp", args.warp)
                ev, res = run_on_pairs(pairs, "dprc", warp=warp, device=args.device, seed=args.seed, options=cfg)
                if args.save_warps:
                    Path(args.save_warps).mkdir(parents=True, exist_ok=True)
                    torch.save(res.in_from_out_norm, BC.warps_path(args.save_warps, d, s, ci))
                with torch.no_grad():  # the product's ground-truth-free estimate, beside the truth
                    moved, probe = self_consistency(lambda b: res.aligner.align(b.to(args.device)), pairs.images,
                                                    background(pairs.images), sigma=CONSISTENCY_SIGMA)
                rows = [{"digit": d, "sigma": s, "warp": warp, "cfg": cfg, **ev.to_dict(), "notes": res.notes,
                         "self_consistency_ratio": round(consistency_ratio(moved, probe), 4)}]
                for k in [int(v) for v in args.test_passes.split(",") if v]:
                    with torch.no_grad():
                        Mk = res.aligner.warps(pairs.images.to(args.device), passes=k).cpu()
                    evk = evaluate_warps(pairs, Mk)
                    evk.seconds = ev.seconds
                    rows.append({"digit": d, "sigma": s, "warp": warp, "cfg": {**cfg, "test_passes": k},
                                 **evk.to_dict()})
                BC.emit_rows(rows, args.out)


if __name__ == "__main__":
    main()
