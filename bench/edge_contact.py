"""How well the product's ground-truth-free border check finds objects cut by the image border.

`models.metrics.edge_contact` flags an image whose object reaches its outermost pixel ring
(contact >= EDGE_CONTACT_MIN) on collections with plain borders. On the benchmark's perturbed
digits the truth is known: the share of the source digit each copy still shows
(`models.metrics.content_kept` of the ground-truth warp). Per sigma, all digits: how often the flag
is raised, its precision and recall for "this copy shows < 99 % of its digit", the AUC of the
contact score, and the collection-level plain-border gate. With --warps (folders of
`bench/sweep.py --save-warps` files), also the pair residual of the fitted warps on pairs with a
flagged copy against pairs with none. With --photos, the check on scikit-image's natural images
(where the borders are not background). No fitting.

    python bench/edge_contact.py --sigmas 0.1,0.2,0.3 --photos \\
        --warps bench/results/warps/defaults_s20,bench/results/warps/defaults_s30 --out bench/results/edge_contact.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines_common as BC  # noqa: E402
import torch  # noqa: E402
from protocol_visibility import copy_visibility  # noqa: E402

from models import geometry as G  # noqa: E402
from models import metrics as M  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.imageops import background  # noqa: E402


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).double().mean()
    eq = (pos[:, None] == neg[None, :]).double().mean()
    return float(gt + 0.5 * eq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--sigmas", default="0.1,0.2,0.3")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threshold", type=float, default=M.EDGE_CONTACT_MIN)
    ap.add_argument("--warps", default="", help="comma-separated folders of warps_d<D>_s<S>_c0.pt files")
    ap.add_argument("--photos", action="store_true", help="also run the check on scikit-image's natural images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folders = [Path(f) for f in args.warps.split(",") if f]
    rows, residual_rows = [], []
    print("| σ | copies flagged | precision (< 99 % shown) | recall | AUC | images with plain borders |")
    print("|---|---|---|---|---|---|")
    for s in [float(v) for v in args.sigmas.split(",")]:
        scores, truth, plains = [], [], []
        for d in [int(v) for v in args.digits.split(",")]:
            src = mnist_digits(d, args.n)
            pairs = BC.pairs_for(d, s, args.n)
            x = pairs.images.double()
            contact, plain = M.edge_contact(x, background(x))
            shown = copy_visibility(src, pairs)
            scores.append(contact)
            truth.append(shown < 0.99)
            plains.append(plain)
            flagged = contact >= args.threshold
            N = pairs.n_sources
            for folder in folders:
                f = BC.warps_path(folder, d, s)
                if not f.exists():
                    continue
                pix = G.pixel_from_normalised(torch.load(f).double(), x.shape[-2:], x.shape[-2:])
                r = M.pair_residual(*pairs.split(pix), tuple(x.shape[-2:]))
                either = flagged[:N] | flagged[N:]
                residual_rows.append({
                    "digit": d, "sigma": s, "warps": str(f), "pairs_flagged": int(either.sum()),
                    "median_flagged": round(float(r[either].median()), 3) if either.any() else None,
                    "median_clear": round(float(r[~either].median()), 3) if (~either).any() else None,
                    "mean_flagged": round(float(r[either].mean()), 3) if either.any() else None,
                    "mean_clear": round(float(r[~either].mean()), 3) if (~either).any() else None,
                })
        c, y, p = torch.cat(scores), torch.cat(truth), torch.cat(plains)
        flag = c >= args.threshold
        tp = int((flag & y).sum())
        row = {"sigma": s, "flagged": round(float(flag.double().mean()), 4),
               "precision": round(tp / max(1, int(flag.sum())), 4), "recall": round(tp / max(1, int(y.sum())), 4),
               "auc": round(auc(c, y), 4), "cut_share": round(float(y.double().mean()), 4),
               "plain_share": round(float(p.double().mean()), 4)}
        rows.append(row)
        print(f"| {s:.0%} | {row['flagged']:.0%} | {row['precision']:.2f} | {row['recall']:.2f} | {row['auc']:.3f} "
              f"| {row['plain_share']:.0%} |")
    if residual_rows:
        print("\n| digit | σ | pairs with a flagged copy | residual median flagged / clear (px) | mean flagged / clear |")
        print("|---|---|---|---|---|")
        for r in residual_rows:
            print(f"| {r['digit']} | {r['sigma']:.0%} | {r['pairs_flagged']} | {r['median_flagged']} / {r['median_clear']} "
                  f"| {r['mean_flagged']} / {r['mean_clear']} |")
    photo_rows = photos(args.threshold) if args.photos else []
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python bench/edge_contact.py " + " ".join(sys.argv[1:]),
                                              "threshold": args.threshold, "rows": rows,
                                              "residual_rows": residual_rows, "photos": photo_rows}, indent=1))


PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "page", "clock", "text", "moon", "horse",
          "hubble_deep_field")


def photos(threshold: float) -> list[dict]:
    """The border check on the natural images that ship with scikit-image, one at a time."""
    import numpy as np
    from skimage import data

    out = []
    print("\n| scikit-image picture | border plain | contact | would be flagged |")
    print("|---|---|---|---|")
    for name in PHOTOS:
        a = np.asarray(getattr(data, name)(), dtype=np.float64)
        a = a / 255.0 if a.max() > 1 else a
        x = torch.from_numpy(a)
        x = x[None, None] if x.ndim == 2 else x[..., :3].permute(2, 0, 1)[None]
        contact, plain = M.edge_contact(x, background(x))
        row = {"name": name, "plain": bool(plain[0]), "contact": round(float(contact[0]), 3),
               "flagged": bool(plain[0]) and float(contact[0]) >= threshold}
        out.append(row)
        print(f"| {name} | {'yes' if row['plain'] else 'no'} | {row['contact']:.2f} | {'yes' if row['flagged'] else 'no'} |")
    return out


if __name__ == "__main__":
    main()
