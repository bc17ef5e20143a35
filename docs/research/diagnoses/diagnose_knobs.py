"""Does the GPU's way of feeding the schedule change a fit? Two ``congeal align`` jobs on one CPU
collection, identical but for how the trainer reads its per-step knobs (blur width, warp-family
limit, C's gate): as Python numbers (the CPU's path) or as device tensors (the GPU's path inside a
captured graph: the blur by a fixed-radius kernel, the family chosen by rank on the device). The GPU's
1k job crops and the CPU's does not; this separates the knobs from bf16 and the card.

    python docs/research/diagnoses/diagnose_knobs.py --n 1000 --options "--option reframe=0 --option batch_size=256" \
        --out bench/results/session12/knobs_cpu.jsonl

The two jobs run side by side, one torch thread each. One JSON line per job: the knob path, seconds,
the ground-truth evaluation, the job's notes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

# Runs the CLI with StepRunner's knob path forced (argv[1]: "device" or "host").
CHILD = r"""
import sys
import models.dprc_train as T
on_device = sys.argv[1] == "device"
init = T.StepRunner.__init__
T.StepRunner.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "knobs_on_device": on_device})
from congeal.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def main() -> None:
    import numpy as np

    from models import synth as Y
    from models.data import mnist_digits
    from models.evaluate import evaluate_collection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--options", default="--option reframe=0 --option batch_size=256")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="knobs-"))
    col = work / "collection"
    if not (col / "truth" / "meta.json").exists():
        Y.write_collection(col, mnist_digits(a.digit), a.n, Y.SynthConfig(sigma=a.sigma))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    t0 = time.time()
    for path in ("host", "device"):
        cmd = [sys.executable, "-c", CHILD, path, "align", str(col / "images"), "--out", str(work / path),
               "--device", "cpu", "--quiet", "--overwrite", *a.options.split()]
        procs[path] = subprocess.Popen(cmd, stdout=open(work / f"{path}.log", "wb"), stderr=subprocess.STDOUT, env=env)
    c = Y.open_collection(col)
    for path, p in procs.items():
        rc = p.wait()
        row = {"knobs": path, "n_images": a.n, "digit": a.digit, "sigma": a.sigma, "options": a.options, "rc": rc,
               "seconds": round(time.time() - t0, 1)}
        if rc == 0:
            m = json.loads((work / path / "metrics.json").read_text())
            ev = evaluate_collection(c.images, c.src_from_input, np.load(work / path / "transforms.npy"),
                                     sources=c.sources)
            row.update(eval=ev.to_dict(), notes=m.get("notes"), framing=m.get("framing_summary"))
        else:
            row["log_tail"] = (work / f"{path}.log").read_text(errors="replace")[-2000:]
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
