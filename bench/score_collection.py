"""Score a job's transforms against a synthetic collection's ground truth, streamed in chunks.

    python bench/score_collection.py DIR TRANSFORMS.npy [--device cuda] [--chunk SOURCES]

``DIR`` is a folder written by ``bench/make_collection.py``; ``TRANSFORMS.npy`` holds the job's
``(N, 3, 3)`` pixel transforms in the product's convention (aligned-output pixel -> input pixel,
one per image, in the collection's image order). Prints one JSON line:
:func:`models.evaluate.evaluate_collection`'s measures (those of ``evaluate_warps``) plus the
seconds the scoring took. Memory stays bounded (one chunk plus 12 bytes per image).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from models.evaluate import evaluate_collection  # noqa: E402
from models.synth import open_collection  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("collection")
    ap.add_argument("transforms")
    ap.add_argument("--chunk", type=int, default=None, help="sources per step (default 1024 on a CPU, 65536 on a GPU)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        col = open_collection(args.collection)
        T = np.load(args.transforms, mmap_mode="r", allow_pickle=False)
        if T.ndim != 3 or T.shape[1:] != (3, 3) or len(T) != len(col.images):
            raise ValueError(f"{args.transforms}: expected ({len(col.images)}, 3, 3) transforms, got {T.shape}")
        if not np.issubdtype(T.dtype, np.floating):
            raise ValueError(f"{args.transforms}: transforms must be floating point, got {T.dtype}")
    except (OSError, ValueError) as e:
        print(f"score_collection: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    ev = evaluate_collection(col.images, col.src_from_input, T, sources=col.sources, copies=col.copies,
                             chunk=args.chunk, device=args.device)
    row = {"collection": args.collection, "transforms": args.transforms, **ev.to_dict(),
           "score_seconds": round(time.perf_counter() - t0, 2)}
    row.pop("seconds", None)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
