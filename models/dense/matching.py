"""Pseudo-correspondences: sparse, noisy matches between every pair of images of a collection,
from dense descriptors (:mod:`models.dense.features`), as ASIC takes them from DINO features.

For each unordered pair ``(a, b)`` a match is a *mutual nearest neighbour* of the descriptors
(cosine similarity) that also passes a ratio test (its distance is well below the second-best
one's, so repeated texture and flat regions, which match anywhere, drop out); the ``per_pair`` best
by similarity are kept. The *foreground* estimate of an image is how often its cells take part in
matches over the whole collection: the object recurs in every image while backgrounds change,
so this is ASIC's saliency mask without a ViT.

Optionally (``verify > 0``; ours, not ASIC's) each pair's matches are checked against one affine
map found by RANSAC, and those farther than ``verify`` (normalised units) from it are dropped:
the objects deform, but not so much that a generous affine tolerance rejects true matches, while
the stray ones (repeated texture, background) fall far from it.

Coordinates: normalised (``align_corners=True``) in each image's own frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .warps import identity_map

__all__ = ["Matches", "pseudo_correspondences", "affine_inliers"]


@dataclass
class Matches:
    pairs: torch.Tensor  # (P, 2) long: image indices (a, b), a < b
    pts_a: torch.Tensor  # (P, M, 2) normalised points in image a
    pts_b: torch.Tensor  # (P, M, 2) the matching points in image b
    weight: torch.Tensor  # (P, M) 1 for a match, 0 for padding
    foreground: torch.Tensor  # (N, h, w) in [0, 1]: the descriptor grid's foreground estimate

    @property
    def count(self) -> int:
        return int(self.weight.sum())


def affine_inliers(pa: torch.Tensor, pb: torch.Tensor, weight: torch.Tensor, tol: float, hypotheses: int = 128,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """RANSAC of one affine map per pair, ``pa -> pb``; which matches it explains within ``tol``.

    Args:
        pa, pb: ``(P, M, 2)`` matched points; weight ``(P, M)``: 1 for a match, 0 for padding.
    Returns:
        ``(P, M)`` bool; a pair with fewer than 4 matches keeps them all.
    """
    P, M, _ = pa.shape
    gen = gen or torch.Generator().manual_seed(0)
    prob = weight.cpu() + 1e-12
    idx = torch.stack([torch.multinomial(prob, 3, replacement=False, generator=gen) for _ in range(hypotheses)], 1)
    idx = idx.to(pa.device)  # (P, R, 3)
    ha = torch.gather(pa.unsqueeze(1).expand(-1, hypotheses, -1, -1), 2, idx.unsqueeze(-1).expand(-1, -1, -1, 2))
    hb = torch.gather(pb.unsqueeze(1).expand(-1, hypotheses, -1, -1), 2, idx.unsqueeze(-1).expand(-1, -1, -1, 2))
    X = torch.cat([ha, torch.ones_like(ha[..., :1])], -1)  # (P, R, 3, 3)
    sol, info = torch.linalg.solve_ex(X, hb)  # (P, R, 3, 2): [A^T; t]
    pah = torch.cat([pa, torch.ones_like(pa[..., :1])], -1)  # (P, M, 3)
    pred = torch.einsum("pmk,prkj->prmj", pah, sol)  # (P, R, M, 2)
    inl = ((pred - pb.unsqueeze(1)).norm(dim=-1) <= tol) & (weight.unsqueeze(1) > 0) & (info == 0).view(P, -1, 1)
    best = inl.sum(-1).argmax(1)  # (P,)
    keep = inl[torch.arange(P, device=pa.device), best]  # (P, M)
    few = weight.sum(1) < 4
    keep[few] = weight[few] > 0
    return keep


def pseudo_correspondences(feats: torch.Tensor, *, per_pair: int = 64, ratio: float = 0.95,
                           min_sim: float = 0.0, verify: float = 0.0) -> Matches:
    """Matches between every pair of images from their descriptors.

    Args:
        feats: ``(N, D, h, w)`` unit-length descriptors.
        per_pair: the most matches kept for a pair (the best by similarity).
        ratio: cosine-distance ratio test, best / second best; 1 turns it off.
        min_sim: matches below this similarity are dropped.
        verify: affine RANSAC tolerance (normalised units); 0: no check.
    Returns:
        :class:`Matches` (pairs without a surviving match keep all-zero weights).
    """
    N, D, h, w = feats.shape
    f = feats.flatten(2).transpose(1, 2)  # (N, hw, D)
    grid = identity_map(h, w, like=feats).reshape(-1, 2)  # (hw, 2)
    ia, ib = torch.triu_indices(N, N, offset=1, device=feats.device)
    P = ia.numel()
    pts_a = feats.new_zeros(P, per_pair, 2)
    pts_b = feats.new_zeros(P, per_pair, 2)
    weight = feats.new_zeros(P, per_pair)
    votes = feats.new_zeros(N, h * w)
    for p in range(P):
        a, b = int(ia[p]), int(ib[p])
        sim = f[a] @ f[b].T  # (hw_a, hw_b)
        top_ab = sim.topk(2, dim=1)
        top_ba = sim.topk(2, dim=0)
        nn_ab = top_ab.indices[:, 0]  # best cell of b for each cell of a
        nn_ba = top_ba.indices[0]  # best cell of a for each cell of b
        mutual = nn_ba[nn_ab] == torch.arange(h * w, device=feats.device)
        d1 = 1 - top_ab.values[:, 0]
        d2 = torch.minimum(1 - top_ab.values[:, 1], (1 - top_ba.values[1])[nn_ab])
        ok = mutual & (d1 <= ratio * d2) & (top_ab.values[:, 0] >= min_sim)
        cells = ok.nonzero().squeeze(1)
        if cells.numel() == 0:
            continue
        s = top_ab.values[cells, 0]
        keep = cells[s.argsort(descending=True)[:per_pair]]
        m = keep.numel()
        pts_a[p, :m] = grid[keep]
        pts_b[p, :m] = grid[nn_ab[keep]]
        weight[p, :m] = 1
    if verify > 0:
        ok = affine_inliers(pts_a, pts_b, weight, verify)
        weight = weight * ok
    # Foreground votes: the cells that took part in kept matches.
    def _cells(pts):
        q = ((pts + 1) / 2 * pts.new_tensor([w - 1, h - 1])).round().long()
        return q[..., 1] * w + q[..., 0]  # (P, M)

    for side, pts in ((0, pts_a), (1, pts_b)):
        img = torch.stack([ia, ib], 1)[:, side].unsqueeze(1).expand(-1, per_pair)  # (P, M)
        votes.index_put_((img.reshape(-1), _cells(pts).reshape(-1)), weight.reshape(-1), accumulate=True)
    fg = votes.view(N, 1, h, w)
    fg = F.avg_pool2d(fg, 3, stride=1, padding=1, count_include_pad=False)
    fg = fg / fg.flatten(1).quantile(0.95, dim=1).clamp_min(1e-6).view(N, 1, 1, 1)
    return Matches(torch.stack([ia, ib], 1), pts_a, pts_b, weight, fg.clamp(0, 1)[:, 0])
