"""DPRC and the baselines side by side, from results already measured.

Reads DPRC rows (JSON lines, ``bench/sweep.py --out`` format) and baseline runs
(``bench/compare_methods.py --out`` JSON) made on the same paired collections
(same digits, sigmas, 500 sources each, same pair seeds), and prints:

* DPRC per digit and sigma against the issue's three targets;
* per sigma and method: the mean over digits of the mean and the median pair
  residual after alignment, content kept, APSNR, and on how many digits the
  method has the lowest median residual.

    python bench/side_by_side.py --dprc bench/results/dprc_defaults_gpu.jsonl \
        --baselines bench/results/baselines_compare_gpu.json

``--dprc`` takes several files (e.g. one per sigma); ``--quality-plot`` draws the median pair
residual after alignment per digit, every method, one panel per sigma (the figure of
``docs/benchmarks.md``):

    python bench/side_by_side.py --dprc bench/results/dprc_defaults_width4_gpu.jsonl \
        bench/results/dprc_defaults_width4_sigma30_gpu.jsonl --baselines bench/results/baselines_compare_gpu.json \
        --quality-plot docs/quality_side_by_side.png

Optionally merges scaling JSON files (``bench/scaling.py --out``) and plots them:

    python bench/side_by_side.py --scaling a.json b.json --plot docs/scaling_gpu.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_dprc(path: str) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [{**r, "method": "dprc"} for r in rows]


def load_baselines(path: str) -> list[dict]:
    return [r for r in json.load(open(path))["records"] if not r.get("error")]


def targets_table(rows: list[dict]) -> str:
    """Per digit and sigma against the issue's targets; rows that carry the object residual
    (``bench/sweep.py`` from the seventh session on) get its ratios in two more columns."""
    obj = any(r.get("object_residual_ratio") is not None for r in rows)
    extra = " object residual ratio | object median after / before |" if obj else ""
    out = ["| digit | σ | residual before → after (px) | ratio (≤ 0.2) | median after / before | "
           "content kept (≥ 0.85) | APSNR after ≥ undone | s |" + extra, "|" + "---|" * (10 if obj else 8)]
    for r in sorted(rows, key=lambda r: (r["sigma"], r["digit"])):
        ok = lambda b: "✓" if b else "✗"  # noqa: E731
        cells = ""
        if obj:
            o = r.get("object_residual_ratio")
            cells = (f" {o:.3f} | {r['object_residual_after_median'] / max(r['object_residual_before'], 1e-9):.3f} |"
                     if o is not None else " – | – |")
        undone = r["apsnr_undone"]
        out.append(
            f"| {r['digit']} | {r['sigma']:.1f} | {r['residual_before']:.2f} → {r['residual_after']:.2f} | "
            f"{r['residual_ratio']:.3f} {ok(r['residual_ratio'] <= 0.2)} | "
            f"{r['residual_after_median'] / max(r['residual_before'], 1e-9):.3f} | "
            f"{r['content_kept']:.3f} {ok(r['content_kept'] >= 0.85)} | "
            f"{r['apsnr_after']:.2f} vs {undone:.2f} {ok(r['apsnr_after'] >= undone)} | "
            f"{r['seconds']:.0f} |" + cells)
    return "\n".join(out)


def compare_table(rows: list[dict]) -> str:
    out = ["| σ | method | digits | residual before | mean residual after | median residual after | "
           "ratio of means | content kept | APSNR after (undone) | lowest median on | s / run |",
           "|" + "---|" * 11]
    sigmas = sorted({r["sigma"] for r in rows})
    for s in sigmas:
        at = [r for r in rows if r["sigma"] == s]
        best: dict[int, str] = {}
        for d in sorted({r["digit"] for r in at}):
            cand = [r for r in at if r["digit"] == d]
            best[d] = min(cand, key=lambda r: r["residual_after_median"])["method"]
        for m in sorted({r["method"] for r in at}, key=lambda m: (m != "dprc", m)):
            rs = [r for r in at if r["method"] == m]
            mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
            wins = sum(1 for d, w in best.items() if w == m)
            out.append(
                f"| {s:.1f} | {m} | {len(rs)} | {mean('residual_before'):.2f} | {mean('residual_after'):.2f} | "
                f"{mean('residual_after_median'):.2f} | {mean('residual_after') / max(mean('residual_before'), 1e-9):.2f} | "
                f"{mean('content_kept'):.3f} | {mean('apsnr_after'):.2f} ({mean('apsnr_undone'):.2f}) | "
                f"{wins}/{len(best)} | {mean('seconds'):.0f} |")
    return "\n".join(out)


def quality_plot(rows: list[dict], path: str) -> None:
    """Per sigma, the median pair residual after alignment (px, log scale) per digit and method,
    with each digit's mean residual before alignment as the line to get under."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({r["sigma"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "dprc", m))
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4.2 * len(sigmas), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sigmas):
        at = [r for r in rows if r["sigma"] == s]
        digits = sorted({r["digit"] for r in at})
        before = [statistics.fmean(r["residual_before"] for r in at if r["digit"] == d) for d in digits]
        ax.step(digits, before, where="mid", color="0.5", ls="--", label="before (mean)")
        for k, m in enumerate(methods):
            pts = sorted((r["digit"], r["residual_after_median"]) for r in at if r["method"] == m)
            if pts:
                ax.plot([d + (k - 2) * 0.08 for d, _ in pts], [v for _, v in pts], "o" if m == "dprc" else ".",
                        ms=7 if m == "dprc" else 6, label=m, color="black" if m == "dprc" else f"C{k - 1}")
        ax.set_yscale("log")
        ax.set_xticks(digits)
        ax.set_xlabel("digit")
        ax.set_title(f"σ = {s:.0%}")
    axes[0][0].set_ylabel("median pair residual after (px)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge_scaling(paths: list[str]) -> list[dict]:
    """Records of several scaling runs; a (method, n) measured twice keeps the later file's."""
    by_key: dict[tuple, dict] = {}
    for p in paths:
        d = json.load(open(p))
        for r in d["records"]:
            by_key[(r["method"], r["n_images"])] = {**r, "file": Path(p).name}
    recs = sorted(by_key.values(), key=lambda r: (r["method"], r["n_images"]))
    for m in {r["method"] for r in recs}:
        rs = [r for r in recs if r["method"] == m and not r.get("error")]
        base = next((r["seconds"] for r in rs if r["n_images"] == 1000), None)
        for r in rs:
            r["seconds_norm"] = round(r["seconds"] / base, 3) if base else None
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dprc", nargs="*", default=[], help="DPRC JSON lines (one or more files)")
    ap.add_argument("--baselines", help="compare_methods.py JSON")
    ap.add_argument("--scaling", nargs="*", default=[], help="scaling.py JSON files, merged in order")
    ap.add_argument("--plot", help="PNG for the merged scaling records")
    ap.add_argument("--title", default="digit 3, sigma 0.1, homography")
    ap.add_argument("--out", help="write the merged scaling records here (JSON)")
    ap.add_argument("--quality-plot", help="PNG: median residual after, per digit, method and sigma")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    if args.dprc:
        d = [r for path in args.dprc for r in load_dprc(path)]
        print("DPRC against the targets\n")
        print(targets_table(d), "\n")
        rows += d
    if args.baselines:
        rows += load_baselines(args.baselines)
    if rows:
        print("Side by side (means over digits)\n")
        print(compare_table(rows), "\n")
        if args.quality_plot:
            quality_plot(rows, args.quality_plot)
    if args.scaling:
        recs = merge_scaling(args.scaling)
        print("| method | images | seconds | × 1k | steps |\n|---|---|---|---|---|")
        for r in recs:
            norm = f"{r['seconds_norm']:.2f}" if r.get("seconds_norm") is not None else "-"
            print(f"| {r['method']} | {r['n_images']} | {r['seconds']:.2f} | {norm} | {r.get('steps')} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"merged_from": args.scaling, "records": recs}, indent=1))
        if args.plot:
            from scaling import plot

            plot(recs, args.plot, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
