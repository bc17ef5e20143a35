"""Diagnosis behind docs/research/quality-rounds-1-9.md: per-image direct optimisation of D from the ground truth
and from the identity (no network), to tell landscape problems from network problems.

    python docs/research/diagnoses/diagnose_landscape.py 0.1
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch
torch.set_num_threads(2)
from models.data import mnist_digits
from models.perturb import make_pairs
from models.evaluate import evaluate_warps
from models import geometry as G
from models.dprc import blur, choose_reference
src=mnist_digits(3,100); sig=float(sys.argv[1]); p=make_pairs(src,sig,seed=1); x=p.images; size=(28,28)
ref=choose_reference(x); R=x[ref:ref+1]
def opt(M0, schedule, steps=150, lr=0.01, tmpl=None):
    q=torch.zeros(x.shape[0],8,requires_grad=True); o=torch.optim.Adam([q],lr=lr)
    T = R if tmpl is None else tmpl
    for sb in schedule:
        for s in range(steps):
            a=G.warp(x, M0@G.offsets_to_homography(q), size)
            l=(blur(a,sb)-blur(T,sb)).abs().mean(dim=(1,2,3)).sum()
            o.zero_grad(); l.backward(); o.step()
    return (M0@G.offsets_to_homography(q)).detach()
eye=torch.eye(3).expand(x.shape[0],3,3)
truth=G.normalised_from_pixel(torch.linalg.inv(p.src_from_input),size,size).float()
# ground truth relative to the reference: undo, then warp like the ref => truth @ inv(truth_ref)
tr = truth @ torch.linalg.inv(truth[ref])
e=evaluate_warps(p,tr); print('truth-relative-to-ref', round(e.residual_ratio,3))
for name,M0,sched in [("from truth, sharp",tr,[0.5]),("identity c2f",eye,[3,2,1,0.5]),("identity sharp",eye,[0.5])]:
    M=opt(M0,sched); e=evaluate_warps(p,M); print(name,'ratio',round(e.residual_ratio,3),'med',round(e.residual_after_median,2),'apsnr',round(e.apsnr_after,2),'kept',round(e.content_kept,3))
