"""Where the pair method ``search`` goes wrong: each stage's candidates against the ground truth.

The pairs are ``bench/pairwise.py``'s (same generator, sets and seed; ``--seed`` is also RANSAC's
seed, as there). A set's pairs go through the stages of :func:`models.pairwise.search.global_search`
as one batch, with the same random numbers as the benchmark, and each candidate's corner error
(px, :func:`models.pairwise.synthetic.corner_error`) is recorded after each stage:

* ``sim``: the similarity search's candidates (and the identity), and the error of the best
  similarity one could have found (the least-squares similarity through the true corners);
* ``r0`` .. ``r3``: after each block-matching round (from ``prune_after`` on, only the kept ones);
  ``scores``: the correlations that decided the pruning and the final ranking;
* ``final``: the search's answer, ``refined``: after the dense refinement.
* ``oracle``: the same rounds with every candidate kept to the end (no pruning): whether a
  candidate would have converged had it gone on;
* ``truth``: the measures at the true homography: the refinement started from it (where does the
  objective's optimum lie?), its block agreement (the confidence) and the search's correlation.

``--config KEY=VALUE`` (JSON) replaces a field of :class:`models.pairwise.search.SearchConfig`.

    python bench/pairwise_misses.py --pairs 32 --seed 0 --threads 1            # the misses only
    python bench/pairwise_misses.py --pairs 32 --seed 0 --threads 1 --all      # every pair
    python bench/pairwise_misses.py --pairs 32 --seed 0 --out misses.json      # and the numbers as JSON
    python bench/pairwise_misses.py --pairs 32 --seed 0 --config refine_smooth=1.5
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from pairwise import make_set

from models import geometry as G
from models.pairwise import search as Q
from models.pairwise.pipeline import _tensor
from models.pairwise.searched import SearchMethodConfig


def _err(M: torch.Tensor, truth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Corner error (px) of normalised ``M`` ``(B, K, 3, 3)`` against pixel truths ``(B, 3, 3)`` -> ``(B, K)``."""
    B, K = M.shape[:2]
    pix = G.pixel_from_normalised(M.reshape(-1, 3, 3).double(), size, size).view(B, K, 3, 3)
    c = G.corners(*size, like=pix)
    p = G.transform_points(pix.reshape(-1, 3, 3), c.expand(B * K, 4, 2)).view(B, K, 4, 2)
    q = G.transform_points(truth.double(), c.expand(B, 4, 2)).view(B, 1, 4, 2)
    d = (p - q).norm(dim=-1).mean(-1)
    return torch.nan_to_num(d, nan=float("inf")).numpy()


def _best_similarity(truth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The corner error (px) of the least-squares similarity through each true homography's corners."""
    c = G.corners(*size, like=truth.double())
    out = []
    for T in truth.double():
        q = G.transform_points(T[None], c[None])[0]  # (4, 2): where the target's corners lie in the source
        # q = [a -b; b a] c + t, linear in (a, b, tx, ty)
        A = torch.zeros(8, 4, dtype=torch.float64)
        A[0::2, 0], A[0::2, 1], A[0::2, 2] = c[:, 0], -c[:, 1], 1
        A[1::2, 0], A[1::2, 1], A[1::2, 3] = c[:, 1], c[:, 0], 1
        x = torch.linalg.lstsq(A, q.reshape(-1, 1)).solution[:, 0]
        out.append(float((A @ x - q.reshape(-1)).view(4, 2).norm(dim=-1).mean()))
    return np.array(out)


def diagnose(kind: str, n: int, seed: int, rho: float, overrides: dict | None = None) -> list[dict]:
    pairs = make_set(kind, n, seed, rho)
    s = torch.stack([_tensor(p["source"]) for p in pairs])
    t = torch.stack([_tensor(p["target"]) for p in pairs])
    truth = torch.from_numpy(np.stack([p["truth"] for p in pairs]))
    size = tuple(t.shape[-2:])
    cfg = replace(SearchMethodConfig(seed=seed).search_config(), **(overrides or {}))
    rec = [{"i": i, "image": p["image"], "modality": p["modality"]} for i, p in enumerate(pairs)]
    for r, e in zip(rec, _best_similarity(truth, size)):
        r["best_similarity"] = float(e)

    def run(keep_all: bool):
        gen = torch.Generator().manual_seed(seed)  # search_pairs' generator
        M, score = Q.similarity_search(s, t, cfg)
        eye = torch.eye(3, dtype=M.dtype).expand(M.shape[0], 1, 3, 3)
        M = torch.cat([M, eye], 1)
        B, K = M.shape[:2]
        stages = {"sim": (_err(M, truth, size), torch.cat([score, torch.full((B, 1), float("nan"))], 1).numpy())}
        Mf = M.reshape(B * K, 3, 3)
        for ri, (longer, grid, block, radius) in enumerate(cfg.rounds):
            if ri == cfg.prune_after and not keep_all:
                sc = Q._score(s, t, Mf, longer, cfg).view(B, K)
                stages["prune_scores"] = (None, sc.numpy())
                top = torch.topk(sc, cfg.keep, dim=1).indices
                Mf = torch.gather(Mf.view(B, K, 3, 3), 1, top[..., None, None].expand(-1, -1, 3, 3)).reshape(-1, 3, 3)
                stages["kept"] = (None, top.numpy())
                K = cfg.keep
            Mf, inl = Q.match_refine(s, t, Mf, longer, grid, block, radius, cfg, generator=gen)
            stages[f"r{ri}"] = (_err(Mf.view(B, K, 3, 3), truth, size), inl.view(B, K).numpy())
        sc = Q._score(s, t, Mf, cfg.rounds[-1][0], cfg).view(B, K)
        stages["final_scores"] = (None, sc.numpy())
        return Mf.view(B, K, 3, 3), sc, stages

    Mk, sc, st = run(False)
    best = sc.argmax(1)
    M0 = Mk[torch.arange(len(pairs)), best]
    R, _ = Q.refine_homography(s, t, M0, cfg)
    agree, _ = Q.block_agreement(s, t, R, cfg)
    final_err = _err(M0[:, None], truth, size)[:, 0]
    ref_err = _err(R[:, None], truth, size)[:, 0]
    _, _, so = run(True)
    Tn = G.normalised_from_pixel(truth, size, size).to(s.dtype)
    Rt, _ = Q.refine_homography(s, t, Tn, cfg)
    from_truth = _err(Rt[:, None], truth, size)[:, 0]
    agree_truth, _ = Q.block_agreement(s, t, Tn, cfg)
    score_truth = Q._score(s, t, Tn, cfg.rounds[-1][0], cfg)
    for b, r in enumerate(rec):
        for name, (e, v) in st.items():
            if e is not None:
                r[f"{name}_err"] = [round(float(x), 2) for x in e[b]]
            r[f"{name}_val"] = [round(float(x), 3) for x in np.asarray(v[b], float)]
        r["chosen"] = int(best[b])
        r["final_err"] = round(float(final_err[b]), 3)
        r["refined_err"] = round(float(ref_err[b]), 3)
        r["confidence"] = round(float(agree[b]), 3)
        r["oracle_err"] = [round(float(x), 2) for x in so["r3"][0][b]]
        r["truth_refined_err"] = round(float(from_truth[b]), 3)
        r["truth_confidence"] = round(float(agree_truth[b]), 3)
        r["truth_score"] = round(float(score_truth[b]), 3)
        r["oracle_scores"] = [round(float(x), 3) for x in so["final_scores"][1][b]]
    return rec


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--sets", default="same")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rho", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--all", action="store_true", help="every pair, not only those 1 px or more off")
    ap.add_argument("--out", default=None, help="write the records as JSON")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = {k: _tuples(json.loads(v)) for k, _, v in (o.partition("=") for o in args.config)}
    torch.set_num_threads(args.threads)
    allrec = {}
    for kind in args.sets.split(","):
        rec = diagnose(kind, args.pairs, args.seed, args.rho, overrides)
        allrec[kind] = rec
        for r in rec:
            if not args.all and r["refined_err"] < 1:
                continue
            print(f"{kind} #{r['i']} {r['image']} ({r['modality']}): refined {r['refined_err']} px, search "
                  f"{r['final_err']} px, confidence {r['confidence']}; best similarity {r['best_similarity']:.2f} px; "
                  f"at the truth: refined to {r['truth_refined_err']} px, confidence {r['truth_confidence']}, "
                  f"score {r['truth_score']}")
            for k in ("sim", "r0", "r1", "prune_scores", "kept", "r2", "r3", "final_scores", "oracle_err",
                      "oracle_scores"):
                for suffix in ("_err", "_val", ""):
                    if k + suffix in r:
                        print(f"    {k + suffix:>18}: {r[k + suffix]}")
    if args.out:
        Path(args.out).write_text(json.dumps(allrec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

