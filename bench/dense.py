"""Dense alignment (``models.dense``, method ``dense``) against ground truth on synthetic collections.

Each collection: ``--n`` images of one ``skimage.data`` object under random TPS + affine warps over
changing backgrounds (``models.dense.synthetic``), so every keypoint's true position in every image
is known. Scores (``models.dense.transfer``): PCK@0.1 and @0.05 of keypoint transfer over every
ordered pair of images (threshold: alpha x the image side), k-cycle PCK@0.1 (ASIC's, k = 2, 3: back
to the start around a cycle of k images) and 3-chain PCK@0.1 (along 3 images, against the truth
at the end). Also the pseudo-correspondences' precision (share within 0.1 x side of the truth).

Methods: ``identity`` (every point stays put), ``dense`` with the weight-free ``hog`` descriptors
(the default) and with ``randconv`` (a random conv net), ``dprc`` (one homography per image, the
product's congealing, through ``models.pipeline``), and ``sift`` (models.pairwise's classic pairwise
homography, every pair). Wall seconds of each fit; ``--device cuda`` trains dense and dprc on a GPU.

    PYTHONPATH=$PWD nice python bench/dense.py --out bench/results/dense
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.dense import warps as W  # noqa: E402
from models.dense.asic import DenseConfig, fit_dense  # noqa: E402
from models.dense.outputs import points_figure, spread_points  # noqa: E402
from models.dense.synthetic import make_collection  # noqa: E402
from models.dense.transfer import chain_pck, cycle_pck, pair_pck, sample_cycles, transfer_points  # noqa: E402


def _homography_transfer(mats_in_from_out: np.ndarray):
    """Transfer through per-image homographies (aligned pixel -> image pixel)."""
    inv = np.linalg.inv(mats_in_from_out)

    def f(a, b, p):
        q = np.concatenate([p, np.ones((len(p), 1))], 1) @ (mats_in_from_out[b] @ inv[a]).T
        return q[:, :2] / q[:, 2:3]
    return f


def _scores(transfer, col, cycles: dict, size) -> dict:
    kp, vis = col.keypoints.numpy().astype(np.float64), col.visible.numpy()
    return {"pck@0.1": pair_pck(transfer, kp, vis, 0.1, size), "pck@0.05": pair_pck(transfer, kp, vis, 0.05, size),
            "2-cycle pck@0.1": cycle_pck(transfer, kp, vis, cycles[2], 0.1, size),
            "3-cycle pck@0.1": cycle_pck(transfer, kp, vis, cycles[3], 0.1, size),
            "3-chain pck@0.1": chain_pck(transfer, kp, vis, cycles[3], 0.1, size)}


def _match_precision(matches, col) -> float:
    tm = col.template_from_image.permute(0, 3, 1, 2)
    pairs, pts_a, pts_b = matches.pairs.cpu(), matches.pts_a.cpu(), matches.pts_b.cpu()
    ta = W.sample_points(tm[pairs[:, 0]], pts_a)
    tb = W.sample_points(tm[pairs[:, 1]], pts_b)
    # Template units -> image pixels (the warps' base scale), against the same 0.1 x side threshold.
    err = (ta - tb).norm(dim=-1) / 1.4 * (col.size[0] - 1) / 2
    w = matches.weight.cpu() > 0
    return float((err[w] <= 0.1 * max(col.size)).float().mean())


def run_dense(col, features: str, steps: int, seed: int, device: str = "cpu"):
    images = col.images.to(device)
    if images.is_cuda:
        torch.cuda.synchronize()
    t0 = time.time()
    fit = fit_dense(images, DenseConfig(steps=steps, features=features, seed=seed))
    if images.is_cuda:
        torch.cuda.synchronize()
    secs = time.time() - t0
    fit.flows, fit.masks = fit.flows.cpu(), fit.masks.cpu()
    fit.atlas = fit.atlas.cpu()
    fl, ms = fit.flows.numpy(), fit.masks.numpy()
    return fit, secs, (lambda a, b, p: transfer_points(fl, a, b, p, ms))


def run_dprc(col, epochs: int | None, device: str = "cpu") -> tuple[np.ndarray, float]:
    from PIL import Image

    from models.pipeline import AlignOptions, align_collection

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "images"
        d.mkdir()
        u8 = (col.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for i, im in enumerate(u8):
            Image.fromarray(im).save(d / f"{i:03d}.png")
        t0 = time.time()
        align_collection(d, Path(tmp) / "out", AlignOptions(method="dprc", device=device, max_side=max(col.size),
                                                            budget=epochs, aligned="none"))
        secs = time.time() - t0
        return np.load(Path(tmp) / "out" / "transforms.npy"), secs


def run_sift(col) -> tuple[object, float, int]:
    from models.pairwise.pipeline import PairOptions, align_pairs

    u8 = (col.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    N = len(u8)
    pairs = [(a, b) for a in range(N) for b in range(a + 1, N)]
    t0 = time.time()
    res = align_pairs([(u8[a], u8[b]) for a, b in pairs], PairOptions(method="sift", device="cpu"))
    secs = time.time() - t0
    M = {}
    failed = 0
    for (a, b), r in zip(pairs, res):
        if r.matrix is None:
            failed += 1
            continue
        M[(a, b)] = np.linalg.inv(np.asarray(r.matrix))  # b_from_a: source a's pixel -> target b's
        M[(b, a)] = np.asarray(r.matrix)

    def f(a, b, p):
        m = M.get((a, b))
        if m is None:
            return np.full_like(p, np.nan)  # no homography: the point is lost (counted as a miss)
        q = np.concatenate([p, np.ones((len(p), 1))], 1) @ m.T
        return q[:, :2] / q[:, 2:3]
    return f, secs, failed


KEYS = ["pck@0.1", "pck@0.05", "2-cycle pck@0.1", "3-cycle pck@0.1", "3-chain pck@0.1", "seconds"]


def table(rows: list[dict]) -> str:
    lines = ["| run | object | method | " + " | ".join(KEYS) + " | pseudo-match precision |",
             "|---|---|---|" + "---|" * (len(KEYS) + 1)]
    for r in rows:
        pp = r.get("pseudo_precision")
        lines.append(f"| {r.get('run', '')} | {r['object']} | {r['method']} | " + " | ".join(
            f"{r[k]:.3f}" if k != "seconds" else f"{r[k]:.1f}" for k in KEYS) + f" | {'' if pp is None else pp} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", nargs="+", metavar="RESULTS_JSON", help="print one table of these results files "
                                                                       "and exit")
    ap.add_argument("--objects", default="chelsea,astronaut,coffee")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=DenseConfig().steps)
    ap.add_argument("--methods", default="identity,dense-hog,dense-randconv,dprc,sift")
    ap.add_argument("--dprc-epochs", type=int, default=None, help="default: DPRC's own schedule")
    ap.add_argument("--cycles", type=int, default=200, help="random cycles per k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for these small convs "
                                                            "on a shared CPU, measured in docs/dense.md)")
    ap.add_argument("--device", default="cpu", help="where dense and dprc train (scores on the CPU)")
    ap.add_argument("--out", default="bench/results/dense")
    args = ap.parse_args(argv)
    if args.report:
        print(table([{**r, "run": Path(f).parent.name} for f in args.report
                     for r in json.loads(Path(f).read_text())["rows"]]), end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    rows = []
    for k, name in enumerate(args.objects.split(",")):
        col = make_collection(name, args.n, args.size, seed=args.seed + k)
        size = col.size
        cycles = {kk: sample_cycles(args.n, kk, args.cycles, seed=args.seed + kk) for kk in (2, 3)}
        for m in methods:
            row = {"object": name, "seed": args.seed + k, "method": m, "n": args.n, "size": args.size}
            if m == "identity":
                row.update(_scores(lambda a, b, p: np.asarray(p, np.float64), col, cycles, size), seconds=0.0)
            elif m.startswith("dense-"):
                fit, secs, tr = run_dense(col, m.split("-", 1)[1], args.steps, args.seed, args.device)
                row.update(_scores(tr, col, cycles, size), seconds=round(secs, 1), timings=fit.timings,
                           steps=args.steps, pseudo_matches=fit.matches.count,
                           pseudo_precision=round(_match_precision(fit.matches, col), 4))
                if m == "dense-hog":
                    ims = col.images.permute(0, 2, 3, 1).numpy()
                    fl, ms = fit.flows.numpy(), fit.masks.numpy()
                    src = spread_points(col.object_mask[0].numpy(), 10)
                    points_figure(ims, 0, src, {b: transfer_points(fl, 0, b, src, ms) for b in range(1, 8)}) \
                        .save(out / f"transfer_{name}.png")
                    from PIL import Image
                    at = fit.atlas[:3].permute(1, 2, 0).clamp(0, 1).numpy()
                    Image.fromarray((at * 255).round().astype(np.uint8)).resize((192, 192), Image.NEAREST) \
                        .save(out / f"atlas_{name}.png")
            elif m == "dprc":
                mats, secs = run_dprc(col, args.dprc_epochs, args.device)
                row.update(_scores(_homography_transfer(mats), col, cycles, size), seconds=round(secs, 1))
            elif m == "sift":
                tr, secs, failed = run_sift(col)
                row.update(_scores(tr, col, cycles, size), seconds=round(secs, 1), pairs_without_homography=failed)
            else:
                raise SystemExit(f"unknown method {m}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"command": "PYTHONPATH=$PWD nice python bench/dense.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " + (
               "CPU only" if args.device == "cpu" else f"training on {torch.cuda.get_device_name()}"
               if args.device.startswith("cuda") else f"training on {args.device}"),
           "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(table(rows))
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
