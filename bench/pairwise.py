"""Pairwise homographies: every pair method side by side on the same pairs, against ground truth.

Sets (``models/pairwise/synthetic.py``; images from ``skimage.data``, shorter side 240 px):

* ``same``: DeTone et al.'s protocol. 128 x 128 patches, each corner moved uniformly by up to
  +-``--rho`` px (32), with photometric change on the target (gamma 0.5-2, blur sigma <= 1.5 px,
  noise sigma <= 0.03); grayscale.
* ``cross``: the same geometry; the source in colour, the target a derived modality that breaks
  intensity matching (gradient magnitude, inverted, a non-monotonic remap, the blue channel),
  cycling through them (and through the images: 24 pairs hold every combination).
* ``unrelated``: patches of two different images, no true homography: how often each method
  still says "aligned" (its confidence above its threshold).

Measures per (set, method): MACE (mean corner error, px, over the target's four corner pixels;
a pair the method returns nothing for counts as an error of ``inf`` in the shares and is left
out of the mean, which is reported with the count of such failures), the share of pairs under
1 px and under 3 px, the median, seconds per pair (wall time of the whole batch / pairs), and the
confidence. One JSON line per (set, method) in ``--out``, and a markdown table on stdout.

    # CPU (this machine, 2 shared cores): a small size
    python bench/pairwise.py --pairs 12 --device cpu --threads 1 --out bench/results/pairwise/cpu.jsonl
    # GPU: the search and the learned method batch every pair of a set; kornia solves one pair at a
    # time, so it runs on the first 24 pairs of each set
    python bench/pairwise.py --pairs 128 --limit kornia=24 --device cuda --out bench/results/pairwise/gpu.jsonl

OpenCV's methods (``sift``, ``orb``, ``ecc``) always run on the CPU; ``search``, ``learned`` and
``kornia`` on ``--device``. ``--option`` sets an option of the learned method; ``--option
search.KEY=VALUE`` one of the search method.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.pairwise import synthetic as S  # noqa: E402
from models.pairwise.pipeline import PairInput, PairOptions, align_pairs  # noqa: E402

SETS = ("same", "cross", "unrelated")
METHODS = ("search", "learned", "sift", "orb", "ecc", "kornia")
ON_DEVICE = ("search", "learned", "kornia")  # the others run on the CPU
WITH_OPTIONS = ("search", "learned")


def make_set(kind: str, n: int, seed: int, rho: float, patch: int = 128) -> list[dict]:
    """``n`` pairs of one set: dicts with ``source``, ``target``, ``truth`` (or None) and labels."""
    rng = np.random.default_rng([seed, SETS.index(kind)])
    names = S.NATURAL_IMAGES if kind != "cross" else S.COLOUR_IMAGES
    images = {nm: S.load_image(nm) for nm in names}
    gray = {nm: (im if im.ndim == 2 else im @ np.array([0.299, 0.587, 0.114], np.float32)) for nm, im in images.items()}
    out = []
    for i in range(n):
        nm = names[i % len(names)]
        if kind == "same":
            p = S.homography_pair(gray[nm], rng, patch, rho, nm)
            out.append(dict(source=p.source, target=S.photometric(p.target, rng), truth=p.source_from_target,
                            image=nm, modality="gray"))
        elif kind == "cross":
            mod = S.MODALITIES[i % len(S.MODALITIES)]  # with the image cycling too: every combination
            p = S.homography_pair(images[nm], rng, patch, rho, nm)
            out.append(dict(source=p.source, target=S.derive_modality(p.target, mod), truth=p.source_from_target,
                            image=nm, modality=mod))
        else:
            other = names[(i + 1 + i // len(names)) % len(names)]
            if other == nm:
                other = names[(i + 1) % len(names)]
            a = S.homography_pair(gray[nm], rng, patch, rho, nm)
            b = S.homography_pair(gray[other], rng, patch, rho, other)
            out.append(dict(source=a.source, target=S.photometric(b.target, rng), truth=None,
                            image=f"{nm}/{other}", modality="gray"))
    return out


def method_options(method: str, options: dict) -> dict:
    """The options of ``method`` among ``--option``'s: ``search.KEY`` for the search method, the
    unprefixed ones for the learned method."""
    if method == "search":
        return {k.partition(".")[2]: v for k, v in options.items() if k.startswith("search.")}
    if method == "learned":
        return {k: v for k, v in options.items() if not k.startswith("search.")}
    return {}


def run(method: str, pairs: list[dict], device: str, options: dict, seed: int) -> dict:
    opts = PairOptions(method=method, device=device if method in ON_DEVICE else "cpu",
                       max_side=1024, seed=seed, method_options=method_options(method, options),
                       batch_size=len(pairs))
    inputs = [PairInput(p["source"], p["target"], f"{i:04d}") for i, p in enumerate(pairs)]
    t0 = time.perf_counter()
    res = align_pairs(inputs, opts)
    seconds = time.perf_counter() - t0
    size = pairs[0]["target"].shape[:2]
    err = []
    for p, r in zip(pairs, res):
        if p["truth"] is None:
            err.append(None)
        else:
            err.append(float("inf") if r.matrix is None else float(S.corner_error(r.matrix, p["truth"], size)))
    return dict(method=method, device=opts.device, seconds_per_pair=seconds / len(pairs),
                errors=err, confidence=[r.confidence for r in res], aligned=[r.aligned for r in res],
                images=[p["image"] for p in pairs], modality=[p["modality"] for p in pairs])


def summary(rec: dict) -> dict:
    conf = np.array(rec["confidence"], float)
    s = dict(set=rec["set"], method=rec["method"], device=rec["device"], n=len(conf),
             seconds_per_pair=rec["seconds_per_pair"], confidence_median=float(np.median(conf)),
             share_reported_aligned=float(np.mean(rec["aligned"])))
    if rec["set"] != "unrelated":
        e = np.array(rec["errors"], float)
        finite = e[np.isfinite(e)]
        said = np.array(rec["aligned"], bool)
        s.update(mace=float(finite.mean()) if len(finite) else None, median=float(np.median(e)),
                 under_1px=float(np.mean(e < 1)), under_3px=float(np.mean(e < 3)),
                 failures=int((~np.isfinite(e)).sum()), aligned_but_wrong=float(np.mean(said & (e >= 3))))
        if rec["set"] == "cross":
            mods = np.array(rec["modality"])
            s["under_3px_by_modality"] = {m: float(np.mean(e[mods == m] < 3)) for m in S.MODALITIES if (mods == m).any()}
    return s


def table(rows: list[dict]) -> str:
    head = ("| set | method | device | pairs | MACE px | median px | < 1 px | < 3 px | failed | s / pair | "
            "conf. median | said aligned | said aligned, ≥ 3 px |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        f = lambda k, fmt: "–" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        lines.append(f"| {r['set']} | {r['method']} | {r['device']} | {r['n']} | {f('mace', '.2f')} | "
                     f"{f('median', '.2f')} | {f('under_1px', '.0%')} | {f('under_3px', '.0%')} | "
                     f"{f('failures', 'd')} | {r['seconds_per_pair']:.3f} | {r['confidence_median']:.2f} | "
                     f"{r['share_reported_aligned']:.0%} | {f('aligned_but_wrong', '.0%')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=12, help="pairs per set")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rho", type=float, default=32.0, help="largest corner move, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the learned method (JSON value), repeatable; search.KEY=VALUE: an option "
                         "of the search method")
    ap.add_argument("--limit", action="append", default=[], metavar="METHOD=N",
                    help="run METHOD on the first N pairs of each set only (e.g. kornia=24: it solves one pair "
                         "at a time); the table's 'pairs' column says how many")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--save-images", default=None, metavar="NPZ",
                    help="only write the benchmark's images to NPZ and exit (then CONGEAL_SKIMAGE_NPZ=NPZ on a "
                         "machine without scikit-image)")
    ap.add_argument("--report", default=None, metavar="JSONL", help="only print the table of a results file")
    args = ap.parse_args(argv)
    if args.report:
        print(table([json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]))
        return 0
    if args.save_images:
        S.save_images(args.save_images, S.NATURAL_IMAGES + S.COLOUR_IMAGES)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = {}
    for o in args.option:
        k, _, v = o.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    limit = {k: int(v) for k, _, v in (x.partition("=") for x in args.limit)}
    methods = args.methods.split(",")
    if args.device.startswith("cuda"):
        # CUDA start-up, kernel selection and the first allocations are not part of a pair's time.
        warm = make_set("same", 2, args.seed + 1, args.rho)
        for m in (m for m in methods if m in ON_DEVICE):
            run(m, warm[:1 if m == "kornia" else 2], args.device, {**options, "steps": [2], "search_steps": [2]}, args.seed)
    rows = []
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.sets.split(","):
        pairs = make_set(kind, args.pairs, args.seed, args.rho)
        for method in methods:
            try:
                rec = run(method, pairs[:limit.get(method, len(pairs))], args.device, options, args.seed)
            except ImportError as e:
                print(f"{kind}/{method}: skipped ({e})", file=sys.stderr)
                continue
            rec.update(set=kind, rho=args.rho, seed=args.seed, options=method_options(method, options))
            s = summary(rec)
            rows.append(s)
            print(json.dumps(s), file=sys.stderr, flush=True)
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps({**s, "rho": args.rho, "seed": args.seed, "options": rec["options"],
                                        "command": " ".join(sys.argv), "errors": rec["errors"],
                                        "confidence": rec["confidence"], "aligned": rec["aligned"],
                                        "images": rec["images"],
                                        "modality": rec["modality"]}) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
