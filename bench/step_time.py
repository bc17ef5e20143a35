"""Seconds per DPRC training step for given configurations (a quick cost check, not a job timing).

Trains each configuration for ``--steps`` steps on one
1,000-image paired collection, without the automatic re-fit, and prints one
JSON line each. The time includes choosing the reference and the final
alignment pass, spread over the steps.

    python bench/step_time.py --device cpu --configs '[{}, {"width": 1, "batch_size": 64}]'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines_common as BC  # noqa: E402
import torch  # noqa: E402

from models.data import mnist_digits  # noqa: E402
from models.dprc import DPRC  # noqa: E402
from models.methods import FitContext  # noqa: E402
from models.perturb import make_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="[{}]", help="JSON list of DPRCConfig overrides")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    args = ap.parse_args()
    x = make_pairs(mnist_digits(3, 500), 0.1, seed=0).images.to(args.device)
    for over in json.loads(args.configs):
        m = DPRC(**{**over, "reframe": 0, "steps": args.steps})
        t0 = time.time()
        res = m.fit(x, FitContext(seed=0))
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        steps = res.plan["steps"]
        row = {"cfg": over, "device": args.device, "threads": torch.get_num_threads(), "n_images": x.shape[0],
               "batch_size": res.plan["batch_size"], "steps": steps, "seconds": round(dt, 2),
               "s_per_step": round(dt / steps, 4)}
        BC.emit_rows([row], args.out)


if __name__ == "__main__":
    main()
