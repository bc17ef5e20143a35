"""Closed-form initialisations judged by the ground-truth pair residual (no training).

Compares the default moment initialisation (centroid + isotropic RMS scale) with an
affine one (covariance matching, ``A = S_i^1/2 R S_ref^-1/2``) with and without a
coarse rotation search against the reference or the aligned mean. CPU, seconds.

    python docs/research/diagnoses/diagnose_init.py 3,1 0.1,0.2,0.3
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from models import geometry as G
from models.data import mnist_digits
from models.perturb import make_pairs
from models.evaluate import evaluate_warps
from models.imageops import background, blur
from models.dprc import moment_init, _moments, choose_reference

def cov_moments(x, bg, eps_pix=1.0):
    """Foreground centroid (B, 2) and covariance (B, 2, 2), normalised coords, + a pixel's variance."""
    H, W = x.shape[-2:]
    f = (x - bg).abs().mean(1)
    mass = f.sum(dim=(1, 2)).clamp_min(1e-8)
    ys = torch.linspace(-1, 1, H, dtype=x.dtype); xs = torch.linspace(-1, 1, W, dtype=x.dtype)
    w = f / mass[:, None, None]
    cx = (w.sum(1) * xs).sum(-1); cy = (w.sum(2) * ys).sum(-1)
    dx = xs[None, None, :] - cx[:, None, None]; dy = ys[None, :, None] - cy[:, None, None]
    sxx = (w * dx * dx).sum((1, 2)); syy = (w * dy * dy).sum((1, 2)); sxy = (w * dx * dy).sum((1, 2))
    e = (2.0 / H) ** 2 / 12 * eps_pix
    S = torch.stack([torch.stack([sxx + e, sxy], -1), torch.stack([sxy, syy + e], -1)], -2)
    return torch.stack([cx, cy], 1), S

def sqrtm(S, inv=False):
    ev, V = torch.linalg.eigh(S)
    d = ev.clamp_min(1e-10).sqrt()
    if inv: d = 1 / d
    return V @ torch.diag_embed(d) @ V.transpose(-1, -2)

def rot(phi):
    c, s = torch.cos(phi), torch.sin(phi)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

def affine_init(x, c_r, S_r, phis=None, ref_img=None, sigma=1.5):
    bg = background(x)
    c, S = cov_moments(x, bg)
    A0 = sqrtm(S) @ sqrtm(S_r, inv=True)
    def build(A):
        out = torch.zeros(A.shape[0], 3, 3, dtype=x.dtype); out[:, :2, :2] = A
        out[:, :2, 2] = c - (A @ c_r[:, None])[..., 0]; out[:, 2, 2] = 1; return out
    if phis is None:
        return build(A0)
    size = tuple(x.shape[-2:])
    rb = blur(ref_img, sigma)
    best = None; bestd = None
    for phi in phis:
        A = sqrtm(S) @ rot(torch.tensor(phi, dtype=x.dtype)) @ sqrtm(S_r, inv=True)
        Mx = build(A)
        al = G.warp(x - bg, Mx, size) + bg
        d = (blur(al, sigma) - rb).abs().mean((1, 2, 3))
        if best is None: best, bestd = Mx.clone(), d
        else:
            m = d < bestd; best[m] = Mx[m]; bestd = torch.minimum(d, bestd)
    return best

def report(tag, pairs, Mn):
    ev = evaluate_warps(pairs, Mn)
    print(f"{tag:28s} ratio {ev.residual_ratio:.3f} med {ev.residual_after_median:.2f} kept {ev.content_kept:.3f} apsnr {ev.apsnr_after:.2f} (undone {ev.apsnr_undone:.2f})", flush=True)

def main() -> None:
    for digit in [int(a) for a in sys.argv[1].split(",")]:
      for sig in [float(a) for a in sys.argv[2].split(",")]:
        src = mnist_digits(digit, 500)
        pairs = make_pairs(src, sig, seed=0)
        x = pairs.images.float()
        print(f"== digit {digit} sigma {sig}")
        ref = choose_reference(x)
        bg = background(x)
        rc, rr, _ = _moments(x[ref:ref+1], bg[ref:ref+1])
        report("moments(iso)", pairs, moment_init(x, rc[0], rr[0]))
        c_r, S_r = cov_moments(x[ref:ref+1], bg[ref:ref+1])
        report("affine sym", pairs, affine_init(x, c_r[0], S_r[0]))
        phis = [math.radians(a) for a in range(-60, 61, 5)]
        report("affine+rot search(ref)", pairs, affine_init(x, c_r[0], S_r[0], phis, x[ref:ref+1]))
        # the rotation searched against the aligned mean instead of one image, twice
        M1 = affine_init(x, c_r[0], S_r[0], phis, x[ref:ref+1])
        for it in range(2):
            al = G.warp(x - bg, M1, x.shape[-2:]) + bg
            tmpl = al.mean(0, keepdim=True)
            M1 = affine_init(x, c_r[0], S_r[0], phis, tmpl)
            report(f"affine+rot search(mean{it})", pairs, M1)


if __name__ == "__main__":
    main()
