"""Robustness (issue 16): DPRC and the baselines on sets that keep the object in view, scored
against ground truth, the frame-free object residual first.

Sets (``--sets``):

* ``canvas``: the benchmark's 28 px digits centred on a 56 px canvas, perturbed as the protocol
  perturbs the digit's own frame (:func:`models.perturb.make_canvas_pairs`).
* ``frame``: the paper's 28 px frames (:func:`models.perturb.make_pairs`); besides all pairs, the
  pairs whose two copies both still show at least 95 % of the digit (``visible``) and the others
  (``cut``) are scored apart: no aligner can make two copies agree on what one no longer shows.
* ``photo``: crops of ``skimage.data`` photographs (colour, the whole frame is content), each view
  sampled from the whole photograph (:func:`models.perturb.make_photo_pairs`).

One JSON line per (set, sigma, subject, method): the :class:`models.evaluate.PairEval` numbers
(``object_residual_ratio``, ``residual_ratio`` at the frame's corners, ``content_kept``,
``frame_size_median``, APSNR after beside ``apsnr_undone``), the failure flags of
``baselines_common``, seconds, and the method's warnings and notes.

    python bench/robustness.py --sets canvas,frame,photo --sigmas 0.1,0.2,0.3 --digits 3 --n 500 \\
        --methods dprc,rasl --device cuda --out bench/results/robustness/gpu.jsonl
    python bench/robustness.py --sets canvas --sigmas 0.3 --digits 3 --n 48 --device cpu   # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines_common as BC  # noqa: E402
from protocol_visibility import copy_visibility  # noqa: E402

from models.data import mnist_digits  # noqa: E402
from models.evaluate import evaluate_warps  # noqa: E402
from models.perturb import PairedSet, make_canvas_pairs, make_pairs, make_photo_pairs  # noqa: E402

# skimage.data photographs: (name, centre of the object (x, y) in the photograph's pixels, its size in pixels).
PHOTOS = {
    "astronaut": ((225.0, 115.0), 150.0),  # the face
    "chelsea": ((240.0, 160.0), 250.0),  # the cat's face
    "coffee": ((290.0, 140.0), 230.0),  # the cup
}
VISIBLE = 0.95


def photo_tensor(name: str, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """The photograph ``(3, H, W)`` in [0, 1], scaled so that its object spans ``size`` pixels,
    and the object's centre in the scaled photograph."""
    import skimage.data

    (cx, cy), obj = PHOTOS[name]
    im = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
    s = size / obj
    H, W = round(im.shape[1] * s), round(im.shape[2] * s)
    im = F.interpolate(im[None], size=(H, W), mode="bilinear", antialias=True, align_corners=False)[0]
    return im.clamp(0, 1), (cx * s, cy * s)


def sets(names: list[str], sigma: float, digits: list[int], n: int, photo_size: int, seed: int,
         photos: tuple[str, ...] = tuple(PHOTOS)):
    """``(set, subject, PairedSet)`` for every requested set at this sigma."""
    for d in digits:
        src = mnist_digits(d, n // 2)
        s = 1000 * d + int(round(sigma * 100)) + seed
        if "canvas" in names:
            yield "canvas", f"digit {d}", make_canvas_pairs(src, sigma, seed=s)
        if "frame" in names:
            yield "frame", f"digit {d}", make_pairs(src, sigma, seed=s)
    if "photo" in names:
        for name in photos:
            photo, centre = photo_tensor(name, photo_size)
            yield "photo", name, make_photo_pairs(photo, n // 2, photo_size, sigma, seed=seed, centre=centre)


def subsets(kind: str, pairs: PairedSet) -> dict[str, torch.Tensor]:
    """Source indices ``(K,)`` of the visible and cut pairs of a ``frame`` set (none for the others)."""
    if kind != "frame" or pairs.sources is None:
        return {}
    vis = copy_visibility(pairs.sources, pairs)
    N = pairs.n_sources
    both = torch.minimum(vis[:N], vis[N:]) >= VISIBLE
    return {name: torch.nonzero(keep).flatten() for name, keep in (("visible", both), ("cut", ~both))
            if int(keep.sum()) >= 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="canvas,frame,photo")
    ap.add_argument("--sigmas", default="0.1,0.2,0.3")
    ap.add_argument("--digits", default="3")
    ap.add_argument("--n", type=int, default=1000, help="images per collection (two copies of n/2 sources)")
    ap.add_argument("--photo-size", type=int, default=64)
    ap.add_argument("--photos", default=",".join(PHOTOS), help="which photographs of the photo set")
    ap.add_argument("--methods", default="dprc")
    ap.add_argument("--dprc-options", default="{}", help="JSON: DPRC options for every run")
    ap.add_argument("--warp", default="homography")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    names, photos = BC.parse_list(a.sets), tuple(BC.parse_list(a.photos))
    for sigma in BC.parse_list(a.sigmas, float):
        for kind, subject, pairs in sets(names, sigma, BC.parse_list(a.digits, int), a.n, a.photo_size, a.seed, photos):
            for method in BC.parse_list(a.methods):
                opts = json.loads(a.dprc_options) if method == "dprc" else {}
                t0 = time.time()
                run = BC.run_method(method, pairs.images, warp=a.warp, device=a.device, seed=a.seed, options=opts)
                row = {"set": kind, "subject": subject, "sigma": sigma, "method": method, "options": opts,
                       "n_images": pairs.images.shape[0], "size": list(pairs.images.shape[-2:]),
                       "machine": BC.machine(a.device), **BC.score(pairs, run)}
                if run.in_from_out_norm is not None:
                    M, N = run.in_from_out_norm, pairs.n_sources
                    for name, idx in subsets(kind, pairs).items():
                        ev = evaluate_warps(pairs.select(idx), torch.cat([M[idx], M[N + idx]]))
                        row[name] = {"pairs": len(idx), **ev.to_dict()}
                row["wall_seconds"] = round(time.time() - t0, 2)
                BC.emit_rows([row], a.out)


if __name__ == "__main__":
    main()
