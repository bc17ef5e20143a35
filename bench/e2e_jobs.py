"""End-to-end congealing jobs as a user runs them, timed and scored against ground truth.

For each size: an infiMNIST-style collection with ground truth is written as ``.npy`` shards
(``models.synth``, not timed), ``python -m congeal align SHARDS --out OUT`` runs in a fresh
process (timed: start-up, reading, training, aligning, writing), and its ``transforms.npy`` is
scored with :func:`models.evaluate.evaluate_collection`. ``--apply`` also times ``congeal apply``
of the trained model on the same images. One JSON line per job: seconds, the child's peak RSS,
the chosen schedule and notes from ``metrics.json``, and the ``PairEval``.

    python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --out jobs.jsonl
    python bench/e2e_jobs.py --sizes 1000000 --device cuda --gen-device cuda --out jobs.jsonl
    python bench/e2e_jobs.py --sizes 1000 --device cpu
    python bench/e2e_jobs.py --sizes 1000 --device cuda --profile   # where the job's host time goes
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import baselines_common as BC  # noqa: E402

from models import synth as Y  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.evaluate import evaluate_collection  # noqa: E402


def _run(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Seconds, exit status and the child's peak RSS (MiB) of one command."""
    t0 = time.time()
    with open(log, "wb") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024  # the largest child so far
    return dt, p.returncode, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,6000")
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--options", default="", help="extra 'congeal align' arguments, one string")
    ap.add_argument("--apply", action="store_true", help="also time 'congeal apply' on the same images")
    ap.add_argument("--work", default=None, help="folder for collections and outputs (default: a temp dir)")
    ap.add_argument("--gen-device", default="cpu",
                    help="where the collection's elastic fields and thickening are drawn: 'cpu' (the default: the "
                         "same images on every machine) or 'cuda' (fast for millions of images, but other images "
                         "than a CPU draws from the same seed)")
    ap.add_argument("--profile", action="store_true",
                    help="run the align child under cProfile and print its 40 costliest calls (cumulative)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="congeal-e2e-"))
    bases = mnist_digits(a.digit)
    gen_dev = a.gen_device if a.gen_device != "cpu" and torch.cuda.is_available() else "cpu"
    for n in BC.parse_list(a.sizes, int):
        # (digit 3 at sigma 0.1 keeps the name earlier sessions' folders had)
        tag = "" if (a.digit, a.sigma) == (3, 0.1) else f"_d{a.digit}_s{a.sigma:g}"
        col = work / f"c{n}_{gen_dev}{tag}"
        if not (col / "truth" / "meta.json").exists():
            t0 = time.time()
            Y.write_collection(col, bases.to(gen_dev), n, Y.SynthConfig(sigma=a.sigma))
            print(f"# collection {n}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        out = work / f"o{n}"
        prof = ["-m", "cProfile", "-o", str(work / f"align{n}.prof")] if a.profile else []
        cmd = [sys.executable, *prof, "-m", "congeal", "align", str(col / "images"), "--out", str(out), "--device", a.device,
               "--quiet", "--overwrite", *a.options.split()]
        secs, rc, rss = _run(cmd, work / f"align{n}.log")
        if a.profile and rc == 0:
            import pstats

            pstats.Stats(str(work / f"align{n}.prof"), stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        row = {"part": "e2e", "n_images": n, "digit": a.digit, "sigma": a.sigma, "device": a.device, "gen_device": gen_dev,
               "options": a.options, "seconds": round(secs, 2), "rc": rc, "peak_rss_mib": rss}
        if rc != 0:
            row["log_tail"] = (work / f"align{n}.log").read_text(errors="replace")[-3000:]
            BC.emit_rows([row], a.out)
            continue
        m = json.loads((out / "metrics.json").read_text())
        row.update({k: m.get(k) for k in ("schedule", "notes", "apsnr_before", "apsnr_after", "framing_summary",
                                          "consistency_summary", "warnings", "stage_seconds")})
        row["job_seconds"] = m.get("seconds")
        c = Y.open_collection(col)
        import numpy as np

        ev = evaluate_collection(c.images, c.src_from_input, np.load(out / "transforms.npy"), sources=c.sources,
                                 device=gen_dev)
        row["eval"] = ev.to_dict()
        if a.apply:
            secs2, rc2, rss2 = _run([sys.executable, "-m", "congeal", "apply", str(out / "model"), str(col / "images"),
                                     "--out", str(work / f"a{n}"), "--device", a.device, "--quiet", "--overwrite"],
                                    work / f"apply{n}.log")
            row["apply"] = {"seconds": round(secs2, 2), "rc": rc2, "images_per_s": round(n / secs2)}
        BC.emit_rows([row], a.out)


if __name__ == "__main__":
    main()
