"""Speed of DPRC's trainer and aligner on one device, and the device's own ceilings.

Parts (``--parts``, comma-separated), each printing and appending JSON lines to ``--out``:

* ``ceilings``: a large bf16 matrix product (TFLOP/s) and a device-to-device copy (bytes read +
  written per second): the measured limits the other numbers are compared with.
* ``throughput``: training steps per second at several batch sizes, for the product's path
  (captured CUDA graph, bf16) and the alternatives (eager, float32), steady state (the first
  block, which holds the capture, is left out); images/s and achieved FLOP/s (counted by
  ``torch.utils.flop_counter`` on one eager step).
* ``profile``: where an eager step's device time goes, by kernel (``torch.profiler``).
* ``inference``: the trained aligner's forward pass (two DeSTNet passes, moment init, warps) on
  uint8 images resident on the device, images/s.
* ``inference_profile``: where the aligner's forward pass spends its device time, by kernel.
* ``quality``: full fits on the benchmark's paired digits (ground truth kept) at given sizes,
  with their ``PairEval`` and seconds.
* ``old``: seconds per step of the previous trainer (a checkout of its ``models/`` named by
  ``--old``), for the before/after.

    python bench/gpu_speed.py --device cuda --parts ceilings,throughput,profile,inference --out r.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import baselines_common as BC  # noqa: E402

import models.nets as NETS  # noqa: E402
from models.data import mnist_digits  # noqa: E402
from models.dprc import DPRC  # noqa: E402
from models.evaluate import evaluate_warps  # noqa: E402
from models.methods import FitContext  # noqa: E402
from models.perturb import make_pairs, perturb, random_perturbations  # noqa: E402


_S2D_DEFAULT = NETS.S2D_MAX_IN_CHANNELS


def _dprc(over: dict | None, **fixed) -> DPRC:
    """DPRC with a config's options; its key ``s2d_max_in`` (not a DPRC option) sets
    ``models.nets.S2D_MAX_IN_CHANNELS`` (the stage blocks run on the space-to-depth input)."""
    over = dict(over or {})
    NETS.S2D_MAX_IN_CHANNELS = int(over.pop("s2d_max_in", _S2D_DEFAULT))
    return DPRC(**{**over, **fixed})


def emit(row: dict, out: str | None) -> None:
    BC.emit_rows([row], out)


def collection(n: int, sigma: float = 0.1, digit: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` perturbed digits as uint8 ``(n, 1, 28, 28)`` (the 500 sources recycled)."""
    src = mnist_digits(digit)
    both = src.repeat(math.ceil(n / src.shape[0]), 1, 1, 1)[:n]
    W = random_perturbations(n, (28, 28), sigma, torch.Generator().manual_seed(seed))
    x = perturb(both, W.float()).clamp(0, 1)
    return (x * 255 + 0.5).to(torch.uint8)


def ceilings(dev, out):
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        a @ b
    ev[1].record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    ev[0].record()
    for _ in range(10):
        y.copy_(x)
    ev[1].record()
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    emit({"part": "ceilings", "device": torch.cuda.get_device_name(dev), "bf16_matmul_tflops": round(tflops, 1),
          "copy_tb_s": round(bw, 3)}, out)
    del a, b, x, y


def _step_flops(cfg_over: dict, B: int, dev) -> float:
    """FLOPs of one training step (forward + backward), counted on an eager step."""
    from torch.utils.flop_counter import FlopCounterMode

    x = collection(max(B, 64)).to(dev)[:B]
    counts = []
    for steps in (1, 2):  # the difference leaves out the reference choice and the final alignment pass
        m = _dprc(cfg_over, graphs=False, steps=steps, reframe=0, batch_size=B)
        with FlopCounterMode(display=False) as fc:
            m.fit(x, FitContext(seed=0))
        counts.append(float(fc.get_total_flops()))
    return counts[1] - counts[0]


def throughput(dev, out, batches, configs, steps):
    for over in configs:
        for B in batches:
            N = max(4 * B, 8192)
            x = collection(N).to(dev)
            marks = []
            m = _dprc(over, steps=steps, reframe=0, batch_size=B)
            BC.sync(dev)
            t0 = time.time()
            res = m.fit(x, FitContext(seed=0, progress=lambda p: marks.append((time.time(), p.step))
                                      if p.stage == "training" and p.step else None))
            BC.sync(dev)
            total = time.time() - t0
            # Steady state: from the end of the first block (which holds the warm-up and capture).
            (t1, s1), (t2, s2) = marks[0], marks[-1]
            if s2 <= s1:
                raise ValueError(f"batch {B}: {steps} steps made one progress block; pass more --steps")
            sps = (s2 - s1) / (t2 - t1)
            try:
                flops = _step_flops(over, B, dev)
            except Exception as e:  # noqa: BLE001
                flops = float("nan")
                print("flop count failed:", e, file=sys.stderr)
            emit({"part": "throughput", "config": over, "batch": B, "n_images": N, "steps": steps,
                  "steps_per_s": round(sps, 2), "ms_per_step": round(1e3 / sps, 3), "images_per_s": round(sps * B),
                  "step_gflop": round(flops / 1e9, 1), "achieved_tflops": round(flops * sps / 1e12, 1),
                  "fit_seconds": round(total, 2), "first_block_s": round(marks[0][0] - t0, 2),
                  "graph": any("with a captured CUDA graph" in n for n in res.notes), "notes": res.notes}, out)
            del x


def profile(dev, out, B, over: dict | None = None):
    from torch.profiler import ProfilerActivity, profile as prof

    x = collection(max(4 * B, 8192)).to(dev)
    m = _dprc(over, graphs=False, steps=24, reframe=0, batch_size=B)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        m.fit(x, FitContext(seed=0))
    table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
    print(table)
    rows = sorted(p.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))[:40]
    emit({"part": "profile", "config": over or {}, "batch": B, "steps": 24, "top": [
        {"name": e.key, "self_cuda_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 2), "calls": e.count}
        for e in rows]}, out)


def inference(dev, out, n, over: dict | None = None):
    x = collection(16384)
    res = _dprc(over, steps=8, reframe=0).fit(x.to(dev), FitContext(seed=0))
    from models.nets import set_compute_dtype

    al = res.aligner
    big = x.repeat(math.ceil(n / x.shape[0]), 1, 1, 1)[:n].to(dev)
    for dtype, chunk in ((None, 8192), (None, 32768), (None, 131072), (torch.bfloat16, 32768),
                         (torch.bfloat16, 131072)):
        set_compute_dtype(al.net, dtype)
        with torch.no_grad():
            al.align(big[:chunk])
            BC.sync(dev)
            t0 = time.time()
            for k in range(0, n, chunk):
                al.align(big[k:k + chunk])
            BC.sync(dev)
        dt = time.time() - t0
        emit({"part": "inference", "config": over or {}, "n_images": n, "chunk": chunk, "dtype": str(dtype), "seconds": round(dt, 3),
              "images_per_s": round(n / dt)}, out)


def inference_profile(dev, out, chunk: int = 32768, over: dict | None = None):
    """Where the aligner's forward pass spends its device time, by kernel (float32 and bf16)."""
    from torch.profiler import ProfilerActivity, profile as prof

    from models.nets import set_compute_dtype

    x = collection(chunk)
    al = _dprc(over, steps=8, reframe=0).fit(x.to(dev), FitContext(seed=0)).aligner
    xd = x.to(dev)
    for dtype in (None, torch.bfloat16):
        set_compute_dtype(al.net, dtype)
        with torch.no_grad():
            al.align(xd)
            BC.sync(dev)
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    al.align(xd)
                BC.sync(dev)
        print(f"# inference profile, {dtype}, chunk {chunk}, 3 calls")
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
        rows = sorted(p.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))[:30]
        emit({"part": "inference_profile", "config": over or {}, "chunk": chunk, "calls": 3, "dtype": str(dtype), "top": [
            {"name": e.key, "self_cuda_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 2), "calls": e.count}
            for e in rows]}, out)


def quality(dev, out, sizes, configs, sigma, digit):
    for n in sizes:
        S = n // 2
        src = mnist_digits(digit)
        src = src.repeat(math.ceil(S / src.shape[0]), 1, 1, 1)[:S]
        pairs = make_pairs(src, sigma, seed=1000 * digit + int(round(sigma * 100)))
        x = (pairs.images * 255 + 0.5).to(torch.uint8)
        for over in configs:
            BC.sync(dev)
            t0 = time.time()
            res = DPRC(**over).fit(x.to(dev), FitContext(seed=0))
            BC.sync(dev)
            dt = time.time() - t0
            ev = evaluate_warps(pairs, res.in_from_out_norm)
            emit({"part": "quality", "digit": digit, "sigma": sigma, "n_images": n, "config": over,
                  "fit_seconds": round(dt, 2), "plan": res.plan, "eval": ev.to_dict(), "notes": res.notes}, out)


OLD_SNIPPET = r"""
import sys, time, json, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2])
from models.dprc import DPRC
from models.methods import FitContext
from gpu_speed import collection
x = collection(1000).float().div(255).cuda()
for epochs in (5, 30):
    torch.cuda.synchronize(); t0 = time.time()
    DPRC(epochs=epochs, reframe=0).fit(x, FitContext(seed=0))
    torch.cuda.synchronize(); print(json.dumps({"epochs": epochs, "steps": epochs * 4, "seconds": time.time() - t0}))
"""


def old(dev, out, old_root):
    # Two fit lengths; their difference over the difference in steps is the per-step time.
    r = subprocess.run([sys.executable, "-c", OLD_SNIPPET, old_root, str(ROOT / "bench")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": old_root})
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if len(rows) != 2:
        emit({"part": "old", "error": r.stderr[-2000:]}, out)
        return
    a, b = rows
    emit({"part": "old", "ms_per_step": round(1e3 * (b["seconds"] - a["seconds"]) / (b["steps"] - a["steps"]), 2),
          "batch": 256, "rows": rows}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="ceilings,throughput,profile,inference")
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--configs", default='[{}, {"precision": "float32"}, {"graphs": false}, '
                                        '{"graphs": false, "precision": "float32"}]')
    ap.add_argument("--steps", type=int, default=192)
    ap.add_argument("--profile-batch", type=int, default=4096)
    ap.add_argument("--profile-configs", default="[{}]", help="JSON list of DPRC options, one profile each")
    ap.add_argument("--inference-n", type=int, default=1_000_000)
    ap.add_argument("--inference-configs", default="[{}]", help="JSON list of DPRC options, one aligner each")
    ap.add_argument("--sizes", default="1000,6000")
    ap.add_argument("--quality-configs", default="[{}]")
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--old", default=None, help="folder holding the previous trainer's models/ package")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    for part in BC.parse_list(a.parts):
        t0 = time.time()
        try:
            if part == "ceilings":
                ceilings(dev, a.out)
            elif part == "throughput":
                throughput(dev, a.out, BC.parse_list(a.batches, int), json.loads(a.configs), a.steps)
            elif part == "profile":
                for over in json.loads(a.profile_configs):
                    profile(dev, a.out, a.profile_batch, over)
            elif part == "inference":
                for over in json.loads(a.inference_configs):
                    inference(dev, a.out, a.inference_n, over)
            elif part == "inference_profile":
                for over in json.loads(a.inference_configs):
                    inference_profile(dev, a.out, over=over)
            elif part == "quality":
                quality(dev, a.out, BC.parse_list(a.sizes, int), json.loads(a.quality_configs), a.sigma, a.digit)
            elif part == "old":
                old(dev, a.out, a.old)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
            import traceback

            traceback.print_exc()
            emit({"part": part, "error": f"{type(e).__name__}: {e}"}, a.out)
        print(f"# part {part}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
