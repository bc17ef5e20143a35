"""Speed of the synthetic generator (models.synth) in memory, and its chunk invariance on a device.

Times the generation of ``--n`` images (uint8 on the device, nothing written) at a few step
sizes, each stage of one step separately (device synchronised around each), checks that chunked
generation equals one-block generation on this device, and that the ground truth is the CPU's.
One JSON line.

    python bench/synth_speed.py --device cuda --n 1000000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from models import synth as Y  # noqa: E402
from models.data import mnist_digits  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--steps", default="32768,131072", help="images per step, comma-separated")
    ap.add_argument("--digit", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    bases = mnist_digits(args.digit).to(dev)
    cfg = Y.SynthConfig()
    row = {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "n": args.n}

    S = 3000
    whole = Y.synth_block(bases, S, 0, S, cfg)
    flat = whole.images.flatten(0, 1)
    for chunk in (777, 4096):
        got = torch.cat([c.images for c in Y.iter_chunks(bases, S, cfg, chunk)])
        row[f"chunk_{chunk}_equal"] = bool(torch.equal(got, flat))
        row[f"chunk_{chunk}_max_diff"] = float((got - flat).abs().max())
    cpu = Y.synth_block(bases.cpu(), S, 0, 64, cfg)
    row["truth_equals_cpu"] = bool(torch.equal(cpu.src_from_input, whole.src_from_input[:, :64]))
    row["sources_max_diff_vs_cpu"] = float((cpu.sources - whole.sources[:64].cpu()).abs().max())

    n_src = args.n // cfg.copies
    for step in [int(s) for s in args.steps.split(",")]:
        src_step = step // cfg.copies
        Y.synth_block(bases, n_src, 0, src_step, cfg)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for a in range(0, n_src, src_step):
            blk = Y.synth_block(bases, n_src, a, min(a + src_step, n_src), cfg)
            q = (blk.images * 255).round_().to(torch.uint8)
        _sync(dev)
        dt = time.perf_counter() - t0
        row[f"step_{step}_seconds"] = round(dt, 3)
        row[f"step_{step}_images_per_s"] = round(args.n / dt)
    del q

    # One step's stages (the largest step).
    a, b = 0, src_step
    stages = {}

    def timed(name, fn):
        _sync(dev)
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        stages[name] = round(time.perf_counter() - t, 4)
        return out

    noise, op, amount = timed("draws", lambda: Y.source_draws(cfg, a, b, (28, 28), device=dev))
    x = timed("morph", lambda: Y.morph(bases[torch.arange(a, b, device=dev) % bases.shape[0]], op, cfg.element, amount))
    f = timed("elastic_field", lambda: Y.elastic_field(noise, cfg.elastic_alpha, cfg.elastic_sigma))
    x = timed("elastic_warp", lambda: Y.elastic_warp(x, f))
    Ws = timed("misalignments_cpu", lambda: [Y.misalignments(cfg, c * n_src + a, c * n_src + b, (28, 28))
                                             for c in range(cfg.copies)])
    imgs = timed("perturb", lambda: [Y._misaligned(x, W) for W in Ws])
    timed("quantise_to_host", lambda: [Y._quantise(i) for i in imgs])
    row["stages_of_one_step"] = {"images": cfg.copies * (b - a), **stages}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
