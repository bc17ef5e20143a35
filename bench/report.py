"""Markdown tables from sweep/benchmark JSON lines (bench/sweep.py --out).

    python bench/report.py bench/results/ablation_round1.jsonl [...]
"""
from __future__ import annotations

import json
import sys


def rows(paths):
    for p in paths:
        for line in open(p):
            if line.strip():
                yield json.loads(line)


def table(records) -> str:
    head = ("| digit | σ | warp | config | residual before → after (px) | ratio | median after | "
            "APSNR before → after (undone) dB | content kept (p10) | s |")
    out = [head, "|" + "---|" * 10]
    for r in records:
        cfg = json.dumps(r.get("cfg", {})) or "{}"
        out.append(
            f"| {r['digit']} | {r['sigma']:.1f} | {r.get('warp', 'homography')} | `{cfg}` | "
            f"{r['residual_before']:.2f} → {r['residual_after']:.2f} | **{r['residual_ratio']:.3f}** | "
            f"{r['residual_after_median']:.2f} | {r['apsnr_before']:.2f} → {r['apsnr_after']:.2f} "
            f"({r['apsnr_undone']:.2f}) | {r['content_kept']:.3f} ({r['content_kept_p10']:.3f}) | {r['seconds']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sorted(rows(sys.argv[1:]), key=lambda r: (r["digit"], r["sigma"], json.dumps(r.get("cfg"))))))
