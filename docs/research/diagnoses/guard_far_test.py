"""Which per-image test says a learned warp lost its object: the aligned frame's corners, or its centre?

The collapse guard counted an image as lost when a corner of its aligned frame landed more than 3
half-widths from the input's centre; the per-image fallback (``metrics.stray_warps``) looks at the
frame's centre (beyond 2 half-widths), its horizon and its scale instead. On the CPU's 1k
job two good warps had a corner at 3.03-3.17; on a GPU, frames at sigma 20 % in frame units passed the
guard once (object ratio 0.305, visible pairs 0.142) and failed it once with 696 of 1,000 frames "flown"
(seventeenth session, call 3). This fits with ``guard=False`` and scores, against the truth, the images
each test flags and the pairs neither flags::

    python docs/research/diagnoses/guard_far_test.py --sigmas 0.2,0.3 --device cuda --out rows.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import baselines_common as BC  # noqa: E402
from robustness import sets, subsets  # noqa: E402

from models import metrics as M  # noqa: E402
from models.evaluate import evaluate_warps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="frame")
    ap.add_argument("--sigmas", default="0.2,0.3")
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--configs", default='[{}, {"equivariance_units": "frame"}]')
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for sigma in BC.parse_list(a.sigmas, float):
        for kind, _, pairs in sets(BC.parse_list(a.sets), sigma, [a.digit], a.n, 64, 0):
            for cfg in json.loads(a.configs):
                opts = {**cfg, "guard": False}
                run = BC.run_method("dprc", pairs.images, warp="homography", device=a.device, options=opts)
                W = run.in_from_out_norm
                if W is None:
                    BC.emit_rows([{"set": kind, "sigma": sigma, "options": opts, "error": run.error}], a.out)
                    continue
                N = pairs.n_sources
                q, w = M.frame_corners(W.double())
                # the guard's test until this diagnosis: a corner beyond 3 half-widths (or behind the horizon)
                corner = (w <= 0).any(1) | (q.abs() > 3.0).any(2).any(1) | ~torch.isfinite(W).flatten(1).all(1)
                q0 = W[:, :2, 2] / W[:, 2, 2, None]
                centre = (q0.abs() > 2.0).any(1) | (W[:, 2, 2] <= 0) | (w <= 0).any(1)
                row = {"set": kind, "sigma": sigma, "options": opts, "seconds": round(run.seconds, 1),
                       "n_corner_far": int(corner.sum()), "n_centre_off": int(centre.sum()),
                       "n_both": int((corner & centre).sum()), "all": evaluate_warps(pairs, W).to_dict()}
                for name, flag in (("corner_far", corner), ("centre_off", centre)):
                    keep = torch.nonzero(~(flag[:N] | flag[N:])).flatten()  # pairs neither copy of which is flagged
                    flagged = torch.nonzero(flag[:N] | flag[N:]).flatten()
                    for tag, idx in ((f"pairs_without_{name}", keep), (f"pairs_with_{name}", flagged)):
                        if len(idx) >= 2:
                            ev = evaluate_warps(pairs.select(idx), torch.cat([W[idx], W[N + idx]])).to_dict()
                            row[tag] = {"pairs": len(idx), **{k: ev[k] for k in ("object_residual_ratio",
                                                                                  "residual_ratio", "content_kept")}}
                for name, idx in subsets(kind, pairs).items():
                    ev = evaluate_warps(pairs.select(idx), torch.cat([W[idx], W[N + idx]])).to_dict()
                    row[name] = {"pairs": len(idx), "object_residual_ratio": ev["object_residual_ratio"]}
                BC.emit_rows([row], a.out)


if __name__ == "__main__":
    main()
