"""Semantic alignment (models/semantic): PCK of transferred keypoints on pairs with known dense
ground truth, and cross-instance pairs' mutual agreement, method by method.

Sets:

* ``mnist``: MNIST digits of one class (``--digit``), padded 6 px and resized to 64 x 64. The model
  trains on ``--train`` digits (the user's collection); the test pairs use other digits: each a
  digit and a random affine + TPS warp of it (rotation +-15 deg, scale and aspect +-15 / 10 %,
  shear 0.1, translation 0.1, TPS control points of a 3 x 3 grid moved by N(0, 0.08), normalised
  units) with appearance changes on the target (gamma, contrast, brightness, noise).
* ``photo``: crops of one ``skimage.data`` photograph (``--photo``, grey, 64 x 64, random position
  and scale around its centre): training crops and other test crops, warped alike.

Keypoints: up to 20 target pixels per pair on the object (target intensity above the image's 70th
percentile), whose true source position lies inside the source; transferred target -> source by
each method, and PCK@a = share within a * 64 px of the truth.

Methods: ``identity``; ``affine`` (the model's first stage only); ``affine+tps`` (the model); the
pair methods of models/pairwise given as ``--homography`` (each pair's homography used as the map).

Cross-instance (``--cross``): pairs of two different test digits, no ground truth. Agreement: the
ink IoU of the warped source and the target (pixels above 0.5 of each), and the cycle error of
target keypoints mapped to the source by the (s, t) flow and back by the (t, s) flow (px); a figure
of overlays (``--figure``).

    nice python bench/semantic.py --set mnist --digit 3 --out bench/results/semantic/mnist3.json \\
        --figure docs/semantic_cross.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.semantic import geometry as SG  # noqa: E402
from models.semantic.model import SemanticConfig, load_model, match_share, save_model  # noqa: E402
from models.semantic.synthetic import WarpSpec, appearance, random_warps, warp_images  # noqa: E402
from models.semantic.train import TrainConfig, fit_semantic  # noqa: E402

SIZE = 64
from models.semantic.method import SemanticPairMethod  # noqa: E402

THRESHOLD = SemanticPairMethod.min_confidence
STRONG = WarpSpec(rotation=30.0, scale=0.25, aspect=0.15, shear=0.15, translation=0.15, tps_sigma=0.12)


def mnist_set(digit: int, n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    from models.data import mnist_digits
    x = mnist_digits(digit)
    if n_train + n_test > len(x):
        raise SystemExit(f"digit {digit} has {len(x)} images; --train + --test must not exceed it")
    x = F.interpolate(F.pad(x, (6, 6, 6, 6)), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x[:n_train].clamp(0, 1), x[n_train:n_train + n_test].clamp(0, 1)


def photo_set(name: str, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    import skimage.data
    from skimage.color import rgb2gray
    im = getattr(skimage.data, name)()
    im = rgb2gray(im) if im.ndim == 3 else im / 255.0
    t = torch.from_numpy(np.asarray(im, np.float32))[None, None]
    H, W = t.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    side = min(H, W) * (0.45 + 0.2 * torch.rand(n, generator=g))  # crop side, px
    cx = W / 2 + (torch.rand(n, generator=g) - 0.5) * 0.15 * W
    cy = H / 2 + (torch.rand(n, generator=g) - 0.5) * 0.15 * H
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / (W - 1), side / (H - 1)
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx / (W - 1) - 1, 2 * cy / (H - 1) - 1
    crops = SG.sample(t.expand(n, -1, -1, -1), SG.affine_grid(theta, (SIZE, SIZE)), padding_mode="border")
    return crops[:n_train], crops[n_train:]


def make_pairs(images: torch.Tensor, seed: int, spec: WarpSpec = WarpSpec()) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    w = random_warps(len(images), spec, like=images, generator=g)
    clean = warp_images(images, w)
    target = appearance(clean, generator=g)
    # Keypoints on the object whose true position lies inside the source.
    B = len(images)
    pts = SG.base_grid((SIZE, SIZE), like=images).reshape(1, -1, 2).expand(B, -1, -1)
    true = w.map_points(pts)
    inside = (true.abs() <= 1).all(-1)
    ink = clean.reshape(B, -1)
    on = ink > torch.quantile(ink, 0.7, dim=1, keepdim=True)
    kp, kp_true = [], []
    for b in range(B):
        idx = torch.nonzero(on[b] & inside[b])[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)[:20]]
        kp.append(pts[b, idx]), kp_true.append(true[b, idx])
    return {"source": images, "target": target, "kp": kp, "kp_true": kp_true}


def pck(pred: list[torch.Tensor], true: list[torch.Tensor]) -> dict:
    d = torch.cat([SG.pixel_from_norm_points(p, (SIZE, SIZE)) - SG.pixel_from_norm_points(t, (SIZE, SIZE))
                   for p, t in zip(pred, true)]).norm(dim=-1)
    return {"pck@0.05": float((d <= 0.05 * SIZE).float().mean()), "pck@0.1": float((d <= 0.1 * SIZE).float().mean()),
            "median_px": float(d.median()), "n_points": int(d.numel())}


@torch.no_grad()
def model_points(model, pairs: dict, tps: bool, batch: int = 64) -> tuple[list[torch.Tensor], float]:
    t0, out_pts = time.time(), []
    for k in range(0, len(pairs["source"]), batch):
        s, t = pairs["source"][k:k + batch], pairs["target"][k:k + batch]
        out = model(s, t, tps=tps)
        for j in range(len(s)):
            kp = pairs["kp"][k + j][None]
            sub = type(out)(out.theta[j:j + 1], None if out.tps_dst is None else out.tps_dst[j:j + 1], out.corr_affine[:0])
            out_pts.append(model.map_points(sub, kp, tps)[0])
    return out_pts, (time.time() - t0) / len(pairs["source"])


def homography_points(method: str, pairs: dict, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    from models.pairwise.pipeline import PairInput, PairOptions, align_pairs
    t0 = time.time()
    inputs = [PairInput((pairs["source"][i, 0].numpy() * 255).round().astype(np.uint8),
                        (pairs["target"][i, 0].numpy() * 255).round().astype(np.uint8), f"{i}") for i in range(n)]
    res = align_pairs(inputs, PairOptions(method=method, device="cpu", max_side=SIZE))
    pred = []
    for i, r in enumerate(res):
        kp = SG.pixel_from_norm_points(pairs["kp"][i], (SIZE, SIZE)).double().numpy()
        q = r.target_to_source(kp) if r.matrix is not None else np.full_like(kp, np.nan)
        q = np.where(np.isfinite(q), q, 1e6)  # nothing found: a miss
        pred.append(SG.norm_from_pixel_points(torch.from_numpy(q).float(), (SIZE, SIZE)))
    return pred, pairs["kp_true"][:n], (time.time() - t0) / n


@torch.no_grad()
def cross_agreement(model, a: torch.Tensor, b: torch.Tensor) -> dict:
    """Pairs (a_i -> source, b_i -> target)."""
    res = {}
    B = len(a)
    for name, tps in (("identity", None), ("affine", False), ("affine+tps", True)):
        if tps is None:
            grid = SG.base_grid((SIZE, SIZE), like=a)[None].expand(B, -1, -1, -1)
            cyc = torch.zeros(1)
        else:
            st, ts = model(a, b, tps=tps), model(b, a, tps=tps)
            grid = model.flow(st, (SIZE, SIZE), tps)
            back = model.flow(ts, (SIZE, SIZE), tps)
            on = (b > 0.5).reshape(B, -1)
            pts = SG.base_grid((SIZE, SIZE), like=a).reshape(1, -1, 2).expand(B, -1, -1)
            there = SG.flow_points(grid, pts)
            again = SG.flow_points(back, there)
            err = (SG.pixel_from_norm_points(again, (SIZE, SIZE)) - SG.pixel_from_norm_points(pts, (SIZE, SIZE))).norm(dim=-1)
            cyc = err[on]
        warped = SG.sample(a, grid)
        wa, tb = warped > 0.5, b > 0.5
        iou = ((wa & tb).flatten(1).sum(1).float() / (wa | tb).flatten(1).sum(1).clamp_min(1).float())
        res[name] = {"ink_iou": float(iou.mean()), "cycle_error_px": float(cyc.mean()),
                     "cycle_within_0.05": float((cyc <= 0.05 * SIZE).float().mean()) if tps is not None else None}
    return res


@torch.no_grad()
def confidence_sets(model, pairs: dict, test: torch.Tensor, digit: int) -> dict:
    """The pair method's confidence (match share) on pairs of decreasing relatedness."""
    other, _ = mnist_set((digit + 4) % 10, len(test), 0)
    n = len(test) // 2
    noise = torch.rand(len(test), 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    sets = {"synthetic (same digit, warped)": (pairs["source"], pairs["target"]),
            "cross-instance (two digits of the class)": (test[:n], test[n:2 * n]),
            f"other digit ({(digit + 4) % 10}) as target": (test, other),
            "noise as target": (test, noise)}
    out = {}
    for name, (s, t) in sets.items():
        c = match_share(model, model(s, t))
        q = torch.quantile(c, torch.tensor([0.05, 0.5, 0.95]))
        out[name] = {"q05": round(float(q[0]), 4), "median": round(float(q[1]), 4), "q95": round(float(q[2]), 4),
                     f"share_at_or_above_{THRESHOLD}": round(float((c >= THRESHOLD).float().mean()), 3), "n": len(c)}
    return out


@torch.no_grad()
def figure(model, a: torch.Tensor, b: torch.Tensor, path: Path, n: int = 6) -> None:
    from PIL import Image
    n = min(n, len(a))
    rows = []
    for i in range(n):
        s, t = a[i:i + 1], b[i:i + 1]
        tiles = [s[0, 0], t[0, 0]]
        for tps in (None, False, True):
            if tps is None:
                w = s
            else:
                out = model(s, t, tps=tps)
                w = SG.sample(s, model.flow(out, (SIZE, SIZE), tps))
            tiles.append(torch.stack([w[0, 0], t[0, 0], w[0, 0]], -1))
        row = [torch.stack([x] * 3, -1) if x.ndim == 2 else x for x in tiles]
        pad = torch.ones(SIZE, 4, 3)
        rows.append(torch.cat(sum(([r, pad] for r in row), [])[:-1], dim=1))
    img = torch.cat(sum(([r, torch.ones(4, r.shape[1], 3)] for r in rows), [])[:-1], dim=0)
    Image.fromarray((img.clamp(0, 1).numpy() * 255).astype(np.uint8)).resize(
        (img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("mnist", "photo"), default="mnist")
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--photo", default="chelsea")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--synthetic-steps", type=int, default=TrainConfig.synthetic_steps)
    ap.add_argument("--weak-steps", type=int, default=TrainConfig.weak_steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--homography", default="", help="comma-separated pair methods (e.g. ecc,sift,learned)")
    ap.add_argument("--homography-pairs", type=int, default=100, help="test pairs given to the homography methods")
    ap.add_argument("--test-warps", choices=("default", "strong"), default="default",
                    help="default: the training's ranges; strong: rotation 30 deg, scale 25 %%, aspect 15 %%, shear "
                         "0.15, translation 0.15, TPS 0.12")
    ap.add_argument("--init-model", default=None, help="train starting from this model (e.g. --synthetic-steps 0 "
                    "for the weak stage alone)")
    ap.add_argument("--freeze-features", action="store_true")
    ap.add_argument("--weak-bn-frozen", action="store_true")
    ap.add_argument("--weak-synthetic", choices=("inlier", "grid"), default="inlier")
    ap.add_argument("--weak-lr", type=float, default=TrainConfig.weak_lr)
    ap.add_argument("--model", default=None, help="a trained model to load instead of training")
    ap.add_argument("--save-model", default=None)
    ap.add_argument("--cross", type=int, default=100)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--confidence", action="store_true", help="mnist: the method's confidence on synthetic, "
                    "cross-instance, other-digit and noise pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the model trains (scores on the CPU)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.set == "mnist":
        train, test = mnist_set(args.digit, args.train, args.test)
    else:
        train, test = photo_set(args.photo, args.train, args.test, args.seed)
    rec = {"set": args.set, "digit": args.digit if args.set == "mnist" else None,
           "photo": args.photo if args.set == "photo" else None, "n_train": len(train), "n_test": len(test),
           "seed": args.seed, "device": args.device, "threads": args.threads}
    if args.model:
        model = load_model(args.model)
        rec["model"] = args.model
    else:
        tc = TrainConfig(synthetic_steps=args.synthetic_steps, weak_steps=args.weak_steps, batch=args.batch,
                         seed=args.seed, freeze_features=args.freeze_features, weak_synthetic=args.weak_synthetic,
                         weak_lr=args.weak_lr, weak_bn_frozen=args.weak_bn_frozen)
        t0 = time.time()
        def show(p):
            if p.step % 100 == 0:
                print(f"step {p.step}/{p.total} {p.message} loss {p.loss:.4f} {time.time() - t0:.0f}s",
                      file=sys.stderr, flush=True)

        init = load_model(args.init_model).train().to(args.device) if args.init_model else None
        if init is not None:
            rec["init_model"] = args.init_model
        model, rep = fit_semantic(train.to(args.device), init.cfg if init else SemanticConfig(), tc, progress=show,
                                  model=init)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rec["train_seconds"] = round(time.time() - t0, 1)
        model = model.cpu()
        rec["train"] = tc.to_dict()
        rec["history"] = rep.history[-3:]
        if args.save_model:
            save_model(model, args.save_model, {"train": tc.to_dict()})
    model.eval()
    spec = WarpSpec() if args.test_warps == "default" else STRONG
    rec["test_warps"] = {"name": args.test_warps, **spec.__dict__}
    pairs = make_pairs(test, args.seed, spec)
    methods = {}
    ident = [k for k in pairs["kp"]]
    methods["identity"] = pck(ident, pairs["kp_true"])
    for name, tps in (("affine", False), ("affine+tps", True)):
        pred, sec = model_points(model, pairs, tps)
        methods[name] = pck(pred, pairs["kp_true"]) | {"seconds_per_pair": round(sec, 5)}
    for m in [m for m in args.homography.split(",") if m]:
        n = min(args.homography_pairs, len(test))
        pred, true, sec = homography_points(m, pairs, n)
        methods[f"homography:{m}"] = pck(pred, true) | {"seconds_per_pair": round(sec, 4), "n_pairs": n}
        # the model on the same subset, for a like-for-like row
        methods[f"affine+tps (first {n})"] = pck(model_points(model, {k: v[:n] for k, v in pairs.items()}, True)[0],
                                                  true)
    rec["methods"] = methods
    if args.cross and len(test) >= 2:
        n = min(args.cross, len(test) // 2)
        a, b = test[:n], test[n:2 * n]
        rec["cross"] = cross_agreement(model, a, b) | {"n_pairs": n}
        if args.figure:
            figure(model, a, b, Path(args.figure))
            rec["figure"] = args.figure
    if args.set == "mnist" and args.confidence:
        rec["confidence"] = confidence_sets(model, pairs, test, args.digit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec["methods"], indent=1))
    if "cross" in rec:
        print(json.dumps(rec["cross"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
