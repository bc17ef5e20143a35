"""Thirteenth session: does another weighting of the orientation field (or the plain intensity, or
its ranks) put the refinement's optimum at the truth on the same-modality misses? The dense
refinement started from the true homography, per variant, both seeds' 32 same-modality pairs.
``python docs/research/diagnoses/pairwise_field_weights.py [variants]``
"""
import sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(1, str(ROOT / "bench"))
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
from pairwise import make_set
from models import geometry as G
from models.pairwise import search as Q
from models.pairwise.pipeline import _tensor
from models.pairwise.searched import SearchMethodConfig
from pairwise_misses import _err

orig = Q.orientation_field
def make_field(kind, k=2.0):
    def field(x, mask=None, cell=0.7, smooth=0.5):
        if smooth > 0:
            x = Q._blur(x, smooth)
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]); gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
        c2 = (gx.square() - gy.square()).sum(1, keepdim=True); s2 = (2 * gx * gy).sum(1, keepdim=True)
        m2 = (c2.square() + s2.square() + 1e-12).sqrt(); m = m2.sqrt()
        mm = m if mask is None else m.masked_fill(mask < 0.5, float("nan"))
        med = mm.flatten(2).nanmedian(-1).values[..., None, None]
        if kind == "sq_med":
            w = m2 / (m2 + (k * med).square().clamp_min(1e-12))
        elif kind == "lin_med":
            w = m / (m + (k * med).clamp_min(1e-6))
        elif kind == "mag":  # the plain doubled-angle gradient (structure tensor), normalised by its mean
            mean = m.mean((-2, -1), keepdim=True) if mask is None else (m * mask).sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True).clamp_min(1)
            w = m / mean.clamp_min(1e-6)
        h = Q._blur(torch.cat([c2, s2], 1) * (w / m2), cell)
        return h if mask is None else h * mask
    return field

def intensity(kind):
    def field(x, mask=None, cell=0.7, smooth=0.5):
        x = x.mean(1, keepdim=True)
        if kind == "rank":
            f = x.flatten(1)
            r = f.argsort(1).argsort(1).to(x.dtype) / max(1, f.shape[1] - 1)
            x = r.view_as(x)
        x = Q._blur(x, max(smooth, cell))
        return x if mask is None else x * mask
    return field

variants = {"int": intensity("int"), "rank": intensity("rank"), "base": orig, "sq_med2": make_field("sq_med", 2.0), "sq_med3": make_field("sq_med", 3.0),
            "lin_med2": make_field("lin_med", 2.0), "mag": make_field("mag")}
which = sys.argv[1].split(",") if len(sys.argv) > 1 else list(variants)
for seed in (0, 1):
    pairs = make_set("same", 32, seed, 32.0)
    s = torch.stack([_tensor(p["source"]) for p in pairs]); t = torch.stack([_tensor(p["target"]) for p in pairs])
    truth = torch.from_numpy(np.stack([p["truth"] for p in pairs])); size = tuple(t.shape[-2:])
    cfg = SearchMethodConfig(seed=seed).search_config()
    Tn = G.normalised_from_pixel(truth, size, size).to(s.dtype)
    for name in which:
        Q.orientation_field = variants[name]
        t0 = time.time()
        Rt, _ = Q.refine_homography(s, t, Tn, cfg)
        e = _err(Rt[:, None], truth, size)[:, 0]
        bad = [(i, pairs[i]["image"], round(float(e[i]), 2)) for i in range(len(e)) if e[i] >= 1]
        print(seed, name, f"from truth: <1px {np.mean(e < 1):.0%} median {np.median(e):.2f} {time.time()-t0:.1f}s", bad, flush=True)
    Q.orientation_field = orig
