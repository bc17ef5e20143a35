"""``congeal`` command line.

``align`` and ``apply`` run the core (``models``); ``serve`` and ``demo`` run the
HTTP service and are imported lazily so the core CLI never needs the service
stack. Errors print one line to stderr and exit non-zero.
"""
from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _bar(desc: str):
    """A tqdm progress callback (to stderr), closed on the 'done' stage. Training counts steps;
    every other stage (loading, aligning, writing) counts images."""
    from tqdm import tqdm

    state = {"bar": None, "stage": None}

    def cb(p) -> None:
        if p.stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            state["stage"] = p.stage
            if p.total:
                unit = "step" if p.stage == "training" else "image"
                state["bar"] = tqdm(total=p.total, desc=f"{desc}: {p.stage}", unit=unit,
                                    file=sys.stderr, dynamic_ncols=True, leave=False)
            elif p.stage != "done":
                print(f"{desc}: {p.message or p.stage}", file=sys.stderr)
        bar = state["bar"]
        if bar is not None:
            bar.n = min(p.step, p.total)
            post = {}
            if p.loss is not None:
                post["loss"] = f"{p.loss:.4f}"
            if p.apsnr is not None:
                post["APSNR"] = f"{p.apsnr:.2f}dB"
            if post:
                bar.set_postfix(post, refresh=False)
            bar.refresh()
        if p.stage == "done" and bar is not None:
            bar.close()
            state["bar"] = None

    return cb


class _Registry:
    """argparse ``choices`` read from a registry of the core the first time argparse looks at them.

    The registries import torch (seconds); ``congeal --version``, ``serve`` and ``demo`` never look,
    so they never pay for it, and the API process stays torch-free.
    """

    def __init__(self, load):
        self._load, self._names = load, None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(self._load())
        return self._names

    def __iter__(self):
        return iter(self._get())

    def __contains__(self, name) -> bool:
        return name in self._get()

    def __len__(self) -> int:
        return len(self._get())


def _methods() -> list[str]:
    from models.catalog import list_methods

    return list_methods()


def _warps() -> list[str]:
    from models.geometry import FAMILIES_BY_RANK

    return list(FAMILIES_BY_RANK)


_INPUT_HELP = ("a folder of images (PNG, JPEG, TIFF, BMP; sub-folders included), a .zip/.tar[.gz|.bz2|.xz] "
               "archive of them, a .npy/.npz array, a folder of .npy/.npz or archive shards, or one image file")
_DEVICE_HELP = "torch device: auto (the first GPU if there is one, else the CPU), cpu, cuda, cuda:1, ..."
_ALIGNED_HELP = ("aligned images: one PNG each, uint8 .npy shards of 65,536, or none (auto: png up to 10,000 "
                 "images, none above; transforms.npy always has every image's matrix)")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="congeal", description="Joint image alignment (congealing): align a "
                                 "collection, align new images with the trained aligner, or serve the HTTP API.")
    ap.add_argument("--version", action="version", version=f"congeal {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{align,apply,serve,demo,compose}")

    a = sub.add_parser("align", help="congeal a collection and train an aligner",
                       description="Congeal a collection: learn a warp per image onto a common frame, write the "
                                   "warps, aligned images, statistics and the trained aligner to --out. Every "
                                   "option, the output folder and the input are checked before training starts.")
    a.add_argument("input", help=_INPUT_HELP)
    a.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    # An explicit metavar: argparse would otherwise list the choices (and import torch) at parser build.
    a.add_argument("--method", default="dprc", choices=_Registry(_methods), metavar="METHOD",
                   help="alignment method, one of %(choices)s: dprc is Deep Penalised Reconstruction "
                        "Congealing, dense maps small collections (at most 64 images) densely onto a learned canonical "
                        "grid (docs/dense.md), the others are classic baselines (default: %(default)s)")
    a.add_argument("--warp", default="homography", choices=_Registry(_warps), metavar="WARP",
                   help="warp family, one of %(choices)s, least to most general (default: %(default)s)")
    a.add_argument("--reference", default=None, metavar="NAME",
                   help="name of the reference image, as in the input (a path inside an archive or folder); "
                        "default: the image closest to the blurred mean of the collection")
    a.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="training length: dprc trains until every image has been seen N times (N passes over "
                        "the collection, in steps of one batch); the baselines run N outer iterations; dense trains N steps. Default: "
                        "the method's own schedule (dprc: a step count chosen from the device and the "
                        "collection's size, written to metrics.json as 'schedule')")
    a.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    a.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable, e.g. --option passes=3 --option moment_weight=0.3 "
                        "(DPRCConfig fields for dprc; VALUE is read as JSON when it parses, else as text)")
    a.add_argument("--device", default="auto", help=_DEVICE_HELP)
    a.add_argument("--max-side", type=int, default=128, metavar="PX",
                   help="longest side of the working size in pixels (default: %(default)s)")
    a.add_argument("--gpus", type=int, default=1,
                   help="train one job over this many GPUs of this host (torchrun + DistributedDataParallel); "
                        "with --device cpu, over this many CPU processes (gloo)")
    a.add_argument("--aligned", default="auto", choices=["auto", "png", "npy", "none"], help=_ALIGNED_HELP)
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("apply", help="align new images with a trained aligner",
                       description="Align new images in one forward pass of an aligner trained by 'congeal "
                                   "align' (no re-fitting); writes the same outputs as align, without model/.")
    p.add_argument("model_dir", help="the model/ folder that 'congeal align' wrote in its --out")
    p.add_argument("input", help=_INPUT_HELP)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--aligned", default="auto", choices=["auto", "png", "npy", "none"], help=_ALIGNED_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("serve", help="run the HTTP API (embedded mode without a Redis URL)",
                       description="Run the HTTP API. With CONGEAL_REDIS_URL set, jobs go to Celery workers; "
                                   "without it, this process runs them (embedded mode). Without API keys "
                                   "(CONGEAL_API_KEYS) it refuses to start unless --open is given.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    s.add_argument("--data-dir", default=None, help="artifact folder (default: CONGEAL_DATA_DIR, else ./congeal-data)")
    s.add_argument("--open", action="store_true",
                   help="serve without API keys: every caller is 'anonymous' and sees every job "
                        "(for trying it on localhost; the same as CONGEAL_ALLOW_OPEN=true)")

    d = sub.add_parser("demo", help="align the bundled sample through the real HTTP API, embedded",
                       description="Start the API embedded and open on 127.0.0.1, upload the bundled sample "
                                   "(48 perturbed MNIST digits), follow the job and download its results.")
    d.add_argument("--data-dir", default=None, help="artifact folder (default: ./congeal-data)")
    d.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: 0, a free port)")

    c = sub.add_parser("compose", help="write a Docker Compose file with one worker per GPU",
                       description="Write the Docker Compose file for this host: Redis, the API, and one worker "
                                   "service per GPU (or per group of --gpus-per-worker GPUs), each reserving its "
                                   "own devices by id. Run it from the repository (the file builds from '.').")
    c.add_argument("--gpus", default="1", metavar="N|IDS",
                   help="how many GPUs (ids 0 to N-1), or their ids, comma-separated, e.g. 0,1,3 (default: 1)")
    c.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                   help="GPUs each worker holds, so the most one job trains on (default: 1)")
    c.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="where to write it (default: standard output)")
    _pair_parser(sub)  # pairwise alignment (models/pairwise)
    return ap


def _method_options(pairs: list[str]) -> dict:
    import json

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. passes=3")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _compose(args) -> int:
    from pathlib import Path

    from service.compose import compose_file

    gpus = int(args.gpus) if args.gpus.isdigit() else args.gpus.split(",")
    call = f" --gpus {args.gpus}" + (f" --gpus-per-worker {args.gpus_per_worker}" if args.gpus_per_worker != 1 else "")
    try:
        text = compose_file(gpus, args.gpus_per_worker, args=call if call != " --gpus 1" else "")
    except ValueError as e:
        print(f"congeal compose: error: {e}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "compose":
        return _compose(args)
    if args.cmd == "pair":
        return _run_pair(args)
    if args.cmd in ("serve", "demo"):
        from service.cli import run as service_run  # the service stack, only when asked for

        return service_run(args)
    from models.imageio import InputError
    from models.pipeline import AlignOptions, align_collection, apply_model

    try:
        t0 = time.time()
        if args.cmd == "align":
            opts = AlignOptions(method=args.method, warp=args.warp, reference=args.reference,
                                budget=args.epochs, seed=args.seed, device=args.device,
                                max_side=args.max_side, method_options=_method_options(args.option),
                                aligned=args.aligned, gpus=args.gpus)
            rep = align_collection(args.input, args.out, opts,
                                   progress=None if args.quiet else _bar("align"),
                                   overwrite=args.overwrite)
        else:
            rep = apply_model(args.model_dir, args.input, args.out, device=args.device,
                              progress=None if args.quiet else _bar("apply"),
                              overwrite=args.overwrite, aligned=args.aligned)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"congeal {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"congeal {args.cmd}: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    fmt = lambda v: "n/a" if v is None else f"{v:.2f} dB"  # noqa: E731
    print(f"{rep.n_images} images aligned in {time.time() - t0:.1f}s; "
          f"APSNR {fmt(rep.apsnr_before)} -> {fmt(rep.apsnr_after)}; "
          f"{rep.n_outliers} flagged; results in {rep.out_dir}")
    for w in rep.warnings:
        print(f"congeal {args.cmd}: warning: {w}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- congeal pair (models/pairwise)


def _pair_parser(sub) -> None:
    q = sub.add_parser("pair", help="the homography between two images of one scene (or many pairs)",
                       description="Estimate the homography mapping TARGET onto SOURCE for one pair, or for every "
                                   "pair of a CSV file (source,target[,name] a line). Writes pairs.json (3x3 matrix "
                                   "target pixel -> source pixel, confidence, transferred points) and, per aligned "
                                   "pair, the warped source, an overlay and a checkerboard.")
    q.add_argument("source", nargs="?", help="the image to warp onto the target")
    q.add_argument("target", nargs="?", help="the reference image (the aligned output's frame)")
    q.add_argument("--pairs", default=None, metavar="CSV", help="a file of pairs: source,target[,name] a line "
                                                                "(paths relative to the file)")
    q.add_argument("--collection", default=None, metavar="DIR|ARCHIVE",
                   help="with --pairs: the pairs name images of this folder or archive (relative names), and a "
                        "method that learns (semantic) trains on all of its images first, leaving OUT/model")
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--method", default="search",
                   help="search (default: a global search on gradient orientations and a sub-pixel refinement, no "
                        "network), learned (the search, then a descriptor learned on the pair moves the homography "
                        "with it), sift, orb, ecc, kornia, or semantic (dense: two instances of one category; "
                        "docs/semantic.md); docs/pairwise.md")
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (search: size, candidates, refine; LearnedConfig fields for "
                        "learned; semantic: model=DIR, "
                        "features=FILE.safetensors, synthetic_steps, weak_steps, ...; VALUE read as JSON)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    q.add_argument("--max-side", type=int, default=256, help="longest side of each image's working size")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-confidence", type=float, default=None,
                   help="report a pair as aligned from this confidence on (default: the method's threshold)")
    q.add_argument("--point", action="append", default=[], metavar="X,Y",
                   help="a target pixel to map into the source (repeatable); results in pairs.json")
    q.add_argument("--source-point", action="append", default=[], metavar="X,Y",
                   help="a source pixel to map into the target (repeatable)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.add_argument("--quiet", action="store_true", help="no progress bar")


def _points(items: list[str], flag: str) -> list[list[float]]:
    out = []
    for it in items:
        try:
            x, y = (float(v) for v in it.split(","))
        except ValueError:
            raise ValueError(f"{flag} {it!r}: expected X,Y, e.g. 12.5,40") from None
        out.append([x, y])
    return out


def _run_pair(args) -> int:
    from models.imageio import InputError
    from models.pairwise.pipeline import PairOptions, read_pairs_file, run_pairs

    try:
        if args.pairs is not None:
            if args.source or args.target:
                raise ValueError("give either SOURCE TARGET or --pairs CSV, not both")
            specs = read_pairs_file(args.pairs)
            if args.collection is not None:  # names inside the collection, as the file gives them
                import os

                base = os.path.dirname(os.path.abspath(args.pairs))
                specs = [tuple(os.path.relpath(p, base) for p in sp[:2]) + (sp[2],) for sp in specs]
        elif args.collection is not None:
            raise ValueError("--collection goes with --pairs (a file of pairs of its image names)")
        elif args.source and args.target:
            specs = [(args.source, args.target, "pair")]
        else:
            raise ValueError("give SOURCE and TARGET images, or --pairs CSV")
        pts = {"target": _points(args.point, "--point"), "source": _points(args.source_point, "--source-point")}
        opts = PairOptions(method=args.method, device=args.device, max_side=args.max_side, seed=args.seed,
                           method_options=_method_options(args.option), min_confidence=args.min_confidence)
        t0 = time.time()
        rep = run_pairs(specs, args.out, opts, points=[pts] * len(specs) if any(pts.values()) else None,
                        progress=None if args.quiet else _bar("pair"), overwrite=args.overwrite,
                        collection=args.collection)
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"congeal pair: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("congeal pair: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    print(f"{rep['n_pairs']} pair(s) in {time.time() - t0:.1f}s with {args.method}; {rep['n_aligned']} aligned "
          f"(confidence min {rep['confidence_min']:.2f}, mean {rep['confidence_mean']:.2f}); results in {args.out}")
    if rep["n_aligned"] < rep["n_pairs"]:
        print(f"congeal pair: warning: {rep['n_pairs'] - rep['n_aligned']} pair(s) could not be aligned with "
              f"confidence; see pairs.json", file=sys.stderr)
    return 0
