"""The DeSTNet's convolutions alone, forward + backward, by implementation (issue 14's profile).

The GPU profile of a training step puts ~110 of 170 ms in the DeSTNet's two 7x7 convolutions
(1 -> 16 and 16 -> 32 channels on 28 and 14 px at the GPU's 4x width), run by cuDNN at a few
per cent of the card's bf16 rate. This times those two shapes alone, at the trainer's batch sizes,
forward and backward (input and weight gradients: the warped input carries the gradient back to
the earlier stages), for:

* ``cudnn``: ``F.conv2d`` on NCHW tensors (what the trainer runs), bf16 and float32 (TF32 on);
* ``cudnn_cl``: the same on channels-last tensors;
* ``im2col``: ``F.unfold`` then one matrix product (cuBLAS) and a fold back of the gradient.

``--blocks``: a stage's whole conv -> ReLU -> 2x2 max-pool block, as the network runs it
(``direct``) and on the 2x2 space-to-depth input (``s2d``: one convolution with 4x the channels
each side, the pool a maximum over the four output phases; the same function).

One JSON line per (shape, batch, implementation, dtype): milliseconds per forward + backward,
and the achieved TFLOP/s (2·B·H·W·Cout·Cin·k² per product, three products).

    python bench/conv_shapes.py --device cuda --batches 1024,4096 --out conv.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# (name, in channels, out channels, side, kernel): the two DeSTNet convolutions at the GPU's 4x
# width and at Table 1's width.
SHAPES = (("conv1", 1, 16, 28, 7), ("conv2", 16, 32, 14, 7), ("conv1_w1", 1, 4, 28, 7), ("conv2_w1", 4, 8, 14, 7))


def _im2col_conv(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    B, C, H, W = x.shape
    cols = F.unfold(x, k, padding=k // 2)  # (B, C*k*k, H*W)
    y = torch.matmul(w.flatten(1), cols)  # (B, Cout, H*W)
    return y.view(B, -1, H, W)


def _block(impl: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from models.nets import conv_relu_pool, conv_relu_pool_s2d

    return (conv_relu_pool_s2d if impl == "s2d" else conv_relu_pool)(x, w, b)


def run_blocks(dev: torch.device, batches: list[int], reps: int, out: str | None) -> None:
    torch.backends.cudnn.benchmark = True
    for name, cin, cout, side, k in SHAPES:
        for B in batches:
            flops = 3 * 2.0 * B * side * side * cout * cin * k * k  # the direct convolution's
            for impl in ("direct", "s2d"):
                for dtype in (torch.bfloat16, torch.float32):
                    g = torch.Generator(device=dev).manual_seed(0)
                    x = torch.randn(B, cin, side, side, device=dev, dtype=dtype, generator=g).requires_grad_(True)
                    w = (torch.randn(cout, cin, k, k, device=dev, dtype=dtype, generator=g) * 0.05).requires_grad_(True)
                    b = torch.zeros(cout, device=dev, dtype=dtype, requires_grad=True)

                    def step(x=x, w=w, b=b, impl=impl):
                        _block(impl, x, w, b).float().square().mean().backward()
                        x.grad = w.grad = b.grad = None
                    s = _time(step, reps, dev)
                    row = {"block": name, "batch": B, "impl": impl, "dtype": str(dtype).split(".")[-1],
                           "ms": round(1e3 * s, 3), "tflops_direct_equiv": round(flops / s / 1e12, 2)}
                    print(json.dumps(row), flush=True)
                    if out:
                        with open(out, "a") as f:
                            f.write(json.dumps(row) + "\n")


def _time(fn, reps: int, dev: torch.device) -> float:
    for _ in range(3):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def run(dev: torch.device, batches: list[int], reps: int, out: str | None) -> None:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for name, cin, cout, side, k in SHAPES:
        for B in batches:
            flops = 3 * 2.0 * B * side * side * cout * cin * k * k
            for impl in ("cudnn", "cudnn_cl", "im2col"):
                for dtype in (torch.bfloat16, torch.float32):
                    g = torch.Generator(device=dev).manual_seed(0)
                    x = torch.randn(B, cin, side, side, device=dev, dtype=dtype, generator=g)
                    w = torch.randn(cout, cin, k, k, device=dev, dtype=dtype, generator=g) * 0.05
                    if impl == "cudnn_cl":
                        x = x.contiguous(memory_format=torch.channels_last)
                        w = w.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    w.requires_grad_(True)
                    gy = torch.randn(B, cout, side, side, device=dev, dtype=dtype, generator=g)

                    def step(x=x, w=w, gy=gy, impl=impl, k=k):
                        y = _im2col_conv(x, w, k) if impl == "im2col" else F.conv2d(x, w, padding=k // 2)
                        torch.autograd.backward(y, gy)
                        x.grad = None
                        w.grad = None
                    try:
                        s = _time(step, reps, dev)
                        row = {"shape": name, "batch": B, "impl": impl, "dtype": str(dtype).split(".")[-1],
                               "ms": round(1e3 * s, 3), "tflops": round(flops / s / 1e12, 2)}
                    except RuntimeError as e:  # e.g. out of memory for im2col at large batches
                        row = {"shape": name, "batch": B, "impl": impl, "dtype": str(dtype), "error": str(e)[:300]}
                    print(json.dumps(row), flush=True)
                    if out:
                        with open(out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    del step, x, w, gy  # before the next shape's tensors are made
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1024,4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocks", action="store_true", help="time conv + ReLU + max-pool blocks, direct and s2d")
    a = ap.parse_args()
    if a.blocks:
        return run_blocks(torch.device(a.device), [int(b) for b in a.batches.split(",")], a.reps, a.out)
    run(torch.device(a.device), [int(b) for b in a.batches.split(",")], a.reps, a.out)


if __name__ == "__main__":
    sys.exit(main())
