"""``bench/pairwise.py`` with the search's inner configuration changed: for trying variants.

The pair method ``search`` exposes only a few options (``SearchMethodConfig``); this runs the
benchmark with any field of :class:`models.pairwise.search.SearchConfig` replaced (``--config
KEY=VALUE``, a JSON value; repeatable). Every other argument goes to ``bench/pairwise.py``::

    python bench/pairwise_variants.py --config smooth=1.0 -- --pairs 32 --sets same --methods search --threads 1
    python bench/pairwise_variants.py --config 'rounds=[[64,4,24,12],[64,4,24,8],[128,5,32,8]]' -- --pairs 32
    # refine both of the search's final candidates, keep the one whose refined correlation is highest
    python bench/pairwise_variants.py --refine-candidates corr -- --pairs 32 --sets same --methods search --threads 1

The results' ``command`` field holds the whole command line, ``--config`` included.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
import pairwise
import torch

from models.pairwise import search as Q
from models.pairwise import searched as SD
from models.pairwise.searched import SearchMethodConfig


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _refine_all(choose: str) -> None:
    """Patch ``search_pairs``: its global search returns, per pair, the best of its candidates after
    each is refined (``choose``: by the refined correlation or by block agreement), and its own
    refinement step is skipped (already done)."""
    orig = SD.global_search

    def global_search(source, target, cfg, generator=None):
        M, score = orig(source, target, cfg, generator=generator)  # (B, K, 3, 3), (B, K)
        B, K = M.shape[:2]
        src, tgt = source.repeat_interleave(K, 0), target.repeat_interleave(K, 0)
        R, c = Q.refine_homography(src, tgt, M.reshape(-1, 3, 3), cfg)  # (B K, 3, 3), (B K,)
        if choose == "agree":
            c, _ = Q.block_agreement(src, tgt, R, cfg)
        best = c.view(B, K).argmax(1)
        return R.view(B, K, 3, 3)[torch.arange(B), best][:, None], score.gather(1, best[:, None])

    SD.global_search = global_search
    SD.refine_homography = lambda source, target, M, cfg: (M, torch.full(M.shape[:1], float("nan")))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--refine-candidates", choices=("corr", "agree"), default=None,
                    help="refine every candidate the global search returns (not only its best) and keep, per "
                         "pair, the one with the highest refined correlation (corr) or block agreement (agree)")
    args = ap.parse_args(ours)
    overrides = {}
    for o in args.config:
        k, _, v = o.partition("=")
        overrides[k] = _tuples(json.loads(v))
    base = SearchMethodConfig.search_config
    SearchMethodConfig.search_config = lambda self: replace(base(self), **overrides)
    if args.refine_candidates:
        _refine_all(args.refine_candidates)
    return pairwise.main(rest)


if __name__ == "__main__":
    sys.exit(main())
