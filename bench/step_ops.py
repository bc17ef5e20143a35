"""How many operations one DPRC training step launches, counted on the CPU.

At small batches a GPU step's time is the number of kernels it launches (each a few
microseconds, even inside a captured CUDA graph), not arithmetic. This counts the ATen
operations of one step run the GPU's way (schedule values as device tensors, as inside the
captured graph), forward and backward, at the dispatcher: each is one kernel launch on a GPU,
give or take. View operations (reshapes, slices, transposes) launch nothing and are not counted.
No GPU needed; the count does not depend on the batch.

    python bench/step_ops.py                        # the GPU defaults' step (mnist preset, width 4)
    python bench/step_ops.py --options '{"passes": 1}' --top 20
    python bench/step_ops.py --s2d-max-in 0         # the input layer as a plain conv -> ReLU -> max-pool
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.dprc as D  # noqa: E402
import models.dprc_train as T  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.methods import FitContext  # noqa: E402
from models.perturb import make_pairs  # noqa: E402

VIEWS = {"view", "t", "transpose", "expand", "select", "slice", "unsqueeze", "squeeze", "as_strided", "permute",
         "_unsafe_view", "detach", "alias", "_reshape_alias", "reshape", "unbind", "split", "split_with_sizes",
         "chunk", "narrow", "lift_fresh", "empty", "diagonal", "unfold"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(options: dict) -> collections.Counter:
    """Operations of one training step (after a warm-up step) with these DPRC options."""
    x = make_pairs(mnist_digits(3, 8), 0.1, seed=0).images
    runners = []
    real = T.StepRunner

    def capture(*a, **kw):
        runners.append(real(*a, **{**kw, "knobs_on_device": True}))
        return runners[-1]

    D.StepRunner = capture
    try:
        D.DPRC(**{"batch_size": 16, "preset": "mnist", "width": 4.0, "reframe": 0, "guard": False, **options}).fit(
            x, FitContext(budget=1))
    finally:
        D.StepRunner = real
    r = runners[0]
    r.buf.counter.zero_()
    r._step()  # warm-up: fills the constant caches
    r.buf.counter.zero_()
    with _Count() as c:
        r._step()
    return c.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default="{}", help="JSON: DPRC options")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--s2d-max-in", type=int, default=None,
                    help="models.nets.S2D_MAX_IN_CHANNELS (0: no block on the space-to-depth input)")
    a = ap.parse_args()
    if a.s2d_max_in is not None:
        import models.nets as N
        N.S2D_MAX_IN_CHANNELS = a.s2d_max_in
    ops = count_step(json.loads(a.options))
    print(json.dumps({"options": json.loads(a.options), "s2d_max_in": a.s2d_max_in, "ops_per_step": sum(ops.values()),
                      "top": ops.most_common(a.top)}))


if __name__ == "__main__":
    main()
