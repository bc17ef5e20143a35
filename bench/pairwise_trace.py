"""Watch the learned pair method fit: the corner error (px, against the ground truth) every few
steps of every pyramid level; the global search's candidates' errors beside their scores; and, with
several starts, each start's error before and after the multi-start phase beside its retrieval score. For choosing defaults and diagnosing failures.

    # the astronaut and camera pairs of the development runs, +-8 px, one start
    python bench/pairwise_trace.py --pairs 0,1 --rho 8 --option starts=1
    # the same-modality benchmark pairs 4-6 (+-32 px): the global search's candidates, then the fit
    python bench/pairwise_trace.py --set same --pairs 4,5,6 --rho 32
    # the same without the search: the nine fixed starts before and after the multi-start phase
    python bench/pairwise_trace.py --set same --pairs 4,5,6 --rho 32 --option search=false

``--set dev`` builds pairs as the development runs did (one stream of random numbers over the
photographs in order, photometric change on the target); ``same`` / ``cross`` take them from
``bench/pairwise.py``'s sets (8 pairs, seed 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pairwise as B  # noqa: E402
from models import geometry as G  # noqa: E402
from models.pairwise import synthetic as S  # noqa: E402
from models.pairwise.learned import LearnedConfig, fit_pairs, homography_from_params, start_homographies  # noqa: E402
from models.pairwise.pipeline import _tensor  # noqa: E402


def dev_pairs(n: int, rho: float) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        name = S.NATURAL_IMAGES[i % len(S.NATURAL_IMAGES)]
        im = S.load_image(name)
        im = im if im.ndim == 2 else im @ np.array([0.299, 0.587, 0.114], np.float32)
        p = S.homography_pair(im, rng, rho=rho, name=name)
        out.append(dict(source=p.source, target=S.photometric(p.target, rng), truth=p.source_from_target))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="dev", choices=["dev", "same", "cross"])
    ap.add_argument("--pairs", default="0,1", help="indices of the pairs to fit together")
    ap.add_argument("--rho", type=float, default=8.0)
    ap.add_argument("--every", type=int, default=20, help="print every this many steps")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    idx = [int(i) for i in args.pairs.split(",")]
    options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    pool = dev_pairs(max(idx) + 1, args.rho) if args.set == "dev" else B.make_set(args.set, 8, 0, args.rho)
    pairs = [pool[i] for i in idx]
    src = torch.stack([_tensor(p["source"]) for p in pairs])
    tgt = torch.stack([_tensor(p["target"]) for p in pairs])
    truth = np.stack([p["truth"] for p in pairs])
    size = tuple(pairs[0]["target"].shape[:2])
    cfg = LearnedConfig(**options)
    np.set_printoptions(precision=2, suppress=True, linewidth=200)

    def err(p: torch.Tensor, reps: int = 1) -> np.ndarray:
        M = G.pixel_from_normalised(homography_from_params(p.double()), size, size).numpy()
        return S.corner_error(M, np.repeat(truth, reps, 0), size).reshape(len(pairs), reps)

    def err_of(M: torch.Tensor) -> np.ndarray:  # (B, K, 3, 3) normalised -> (B, K) corner errors
        B, K = M.shape[:2]
        Mp = G.pixel_from_normalised(M.reshape(-1, 3, 3), size, size).numpy()
        return S.corner_error(Mp, np.repeat(truth, K, 0), size).reshape(B, K)

    multi = {}

    def trace(level, step, p, loss):
        if p.shape[0] == len(pairs) * cfg.starts and cfg.starts > 1:
            multi["p"] = p.clone()
        elif step % args.every == 0:
            print(f"level {level} step {step:4d}  error {err(p)[:, 0]}  loss {loss.numpy()}", flush=True)

    fit = fit_pairs(src, tgt, cfg, trace=trace)
    searched = [h for h in fit.history if "search_starts" in h]
    if searched:  # the global search's candidates, best first, and their correlation scores
        cands = torch.tensor(searched[0]["search_starts"], dtype=torch.float64)  # (B, K, 3, 3)
        print("search candidates' errors (rows: pairs, best first)\n", err_of(cands))
        print("their scores\n", np.array(searched[0]["search_scores"]))
    if "p" in multi:
        starts = start_homographies(cfg.starts, cfg.start_shift, like=torch.zeros(1, dtype=torch.float64))
        before = np.stack([S.corner_error(G.pixel_from_normalised(starts, size, size).numpy(),
                                          np.repeat(truth[i:i + 1], cfg.starts, 0), size) for i in range(len(pairs))])
        print("starts' errors before (rows: pairs)\n", before)
        print(f"after {cfg.start_steps} steps\n", err(multi["p"], cfg.starts))
        print("their scores\n", np.array(fit.history[0]["start_scores"]), "\nkept", fit.start.numpy())
    M = G.pixel_from_normalised(fit.source_from_target_norm.double(), size, size).numpy()
    print("final error", S.corner_error(M, truth, size), "confidence", fit.confidence.numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main())
