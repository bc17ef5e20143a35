"""Thirteenth session: would an intensity ECC refinement after the orientation-field one fix the
same-modality misses (docs/research/pairwise-misses.md)? The search's answers (cached), then the
dense refinement again with the blurred intensity instead of the orientation field, applied to
every pair, or only where the intensity correlation at the answer exceeds tau (a same-modality
signal). Prints < 1 px / < 3 px per set and seed. ``python docs/research/diagnoses/pairwise_intensity_refine.py 0.3,0.5,0.7``
"""
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(1, str(ROOT / "bench"))
import numpy as np, torch
torch.set_num_threads(1)
from pairwise import make_set
from models.pairwise import search as Q
from models.pairwise.pipeline import _tensor
from models.pairwise.searched import SearchMethodConfig, search_pairs
from pairwise_misses import _err
import os

def intensity_field(x, mask=None, cell=0.7, smooth=0.5):
    x = Q._blur(x.mean(1, keepdim=True), max(smooth, cell))
    return x if mask is None else x * mask

def int_ncc(s, t, M, cfg, longer=128):
    st = Q._level_size(tuple(t.shape[-2:]), longer); ss = Q._level_size(tuple(s.shape[-2:]), longer)
    src = Q._standardise(Q._resize(s, ss)); tg = Q._standardise(Q._resize(t, st))
    ft = intensity_field(tg, None, cfg.refine_cell, cfg.refine_smooth)
    orig = Q.orientation_field; Q.orientation_field = intensity_field
    try:
        fw, v = Q._warped_field(src, M, st, cfg)
    finally:
        Q.orientation_field = orig
    return Q._field_ncc(ft, fw, v, cfg.min_overlap)

def int_refine(s, t, M, cfg):
    orig = Q.orientation_field; Q.orientation_field = intensity_field
    try:
        return Q.refine_homography(s, t, M, cfg)
    finally:
        Q.orientation_field = orig

taus = [float(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0.3, 0.5, 0.7]
for seed in (0, 1):
    for kind in ("same", "cross"):
        pairs = make_set(kind, 32, seed, 32.0)
        s = torch.stack([_tensor(p["source"]) for p in pairs]); t = torch.stack([_tensor(p["target"]) for p in pairs])
        truth = torch.from_numpy(np.stack([p["truth"] for p in pairs])); size = tuple(t.shape[-2:])
        cache = f"/tmp/congeal_pair_fit_{kind}_{seed}.pt"  # the search's answers, reused between runs
        if os.path.exists(cache):
            R = torch.load(cache)
        else:
            R = search_pairs(s, t, SearchMethodConfig(seed=seed)).source_from_target_norm
            torch.save(R, cache)
        cfg = SearchMethodConfig(seed=seed).search_config()
        e0 = _err(R[:, None], truth, size)[:, 0]
        c1 = int_ncc(s, t, R, cfg)
        R2, _ = int_refine(s, t, R, cfg)
        e2 = _err(R2[:, None], truth, size)[:, 0]
        print(seed, kind, f"base <1px {np.mean(e0 < 1):.0%} <3px {np.mean(e0 < 3):.0%}; int-refine all: <1px {np.mean(e2 < 1):.0%} <3 {np.mean(e2<3):.0%}")
        for tau in taus:
            use = (c1 > tau).numpy()
            e = np.where(use, e2, e0)
            print(f"   tau {tau}: used on {use.sum()} <1px {np.mean(e < 1):.0%} <3px {np.mean(e < 3):.0%} median {np.median(e):.2f}")
        if kind == "same":
            print("   ", [(i, pairs[i]["image"], round(float(e0[i]), 2), round(float(e2[i]), 2), round(float(c1[i]), 2)) for i in range(32) if e0[i] >= 1 or e2[i] >= 1])
        else:
            print("   c1 cross:", np.round(c1.numpy(), 2).tolist())
