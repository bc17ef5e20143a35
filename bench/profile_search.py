"""Where the pair method ``search`` spends its time: wall time per stage, on the benchmark's pairs.

The pairs are ``bench/pairwise.py``'s (same generator, seed and sets); they go through
:func:`models.pairwise.searched.search_pairs` as one batch, as the benchmark sends them, with the
stages timed by wrapping the functions of :mod:`models.pairwise.search` that it calls::

    python bench/profile_search.py --pairs 32 --threads 1            # per-stage table, best of --repeat
    python bench/profile_search.py --pairs 8 --threads 1 --cprofile 25  # and cProfile's top functions

``--root DIR`` times the code of another checkout (e.g. a worktree of an older commit): its
``models`` are imported instead of this one's; the stages are looked up by name.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

# (label, module: search or searched, function name): the stages, in the order they run; nested
# ones are indented
STAGES = (("global search", "searched", "global_search"),
          ("  similarity search", "search", "similarity_search"),
          ("  block matching + RANSAC (4 rounds)", "search", "match_refine"),
          ("    of which RANSAC", "search", "ransac_homography"),
          ("  candidate scores (2)", "search", "_score"),
          ("refinement", "searched", "refine_homography"),
          ("block agreement", "searched", "block_agreement"))


def _timed(acc: dict, label: str, f):
    def g(*args, **kwargs):
        t0 = time.perf_counter()
        out = f(*args, **kwargs)
        acc[label] += time.perf_counter() - t0
        return out
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per set, one batch")
    ap.add_argument("--sets", default="same,cross")
    ap.add_argument("--repeat", type=int, default=2, help="runs per set; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also run each set once under cProfile and print its N costliest functions")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout whose models to time (default: this one)")
    args = ap.parse_args(argv)
    # that checkout's models first: bench/pairwise.py, imported next, finds them already loaded
    sys.path.insert(0, str(Path(args.root).resolve()))
    from models.pairwise import search as Q
    from models.pairwise import searched as SD
    from models.pairwise.pipeline import _tensor

    sys.path.insert(1, str(Path(__file__).resolve().parent))
    from pairwise import make_set

    torch.set_num_threads(args.threads)
    acc: dict = collections.defaultdict(float)
    for label, mod, name in STAGES:
        m = Q if mod == "search" else SD
        setattr(m, name, _timed(acc, label, getattr(m, name)))
    print(f"search.py: {Q.__file__}, torch {torch.__version__}, {args.threads} thread(s)")
    for kind in args.sets.split(","):
        pairs = make_set(kind, args.pairs, 0, 32.0)
        s = torch.stack([_tensor(p["source"]) for p in pairs])
        t = torch.stack([_tensor(p["target"]) for p in pairs])
        SD.search_pairs(s[:1], t[:1])  # first calls: allocations, FFT plans
        best = None
        for _ in range(args.repeat):
            acc.clear()
            t0 = time.perf_counter()
            SD.search_pairs(s, t)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, dict(acc))
        total, stages = best
        n = len(pairs)
        print(f"\n{kind}: {n} pairs, {total / n:.3f} s a pair (fastest of {args.repeat})")
        print("| stage | ms / pair | share |\n|---|---|---|")
        for label, _, _ in STAGES:
            v = stages.get(label, 0.0)
            depth = (len(label) - len(label.lstrip())) // 2
            print(f"| {'↳ ' * depth}{label.strip()} | {1000 * v / n:.0f} | {v / total:.0%} |")
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            SD.search_pairs(s, t)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
