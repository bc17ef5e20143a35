"""The pair search's parts timed alone on the benchmark's pairs (seventeenth session's measurements).

One CPU thread; the pairs are ``bench/pairwise.py``'s (seed 0). Each part prints ms a pair:

    python docs/research/diagnoses/pairwise_search_parts.py --part score     # candidate scores by pairs a chunk
    python docs/research/diagnoses/pairwise_search_parts.py --part canvases  # similarity search by canvases a chunk
    python docs/research/diagnoses/pairwise_search_parts.py --part refine    # refinement, refine_tol 0 / 1e-3
    python docs/research/diagnoses/pairwise_search_parts.py --part converge  # its corner moves, iteration by iteration
    python docs/research/diagnoses/pairwise_search_parts.py --part blur      # banded products vs shifted sums vs conv2d
    python docs/research/diagnoses/pairwise_search_parts.py --part round1    # block-matching round 1 by candidates a call
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))
from pairwise import make_set  # noqa: E402

from models.imageops import gauss_kernel  # noqa: E402
from models.pairwise import search as Q  # noqa: E402
from models.pairwise.pipeline import _tensor  # noqa: E402


def pairs(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ps = make_set(kind, n, 0, 32.0)
    return torch.stack([_tensor(p["source"]) for p in ps]), torch.stack([_tensor(p["target"]) for p in ps])


def timed(f, n: int) -> float:
    t0 = time.perf_counter()
    f()
    return 1000 * (time.perf_counter() - t0) / n


def candidates(s, t, cfg):
    M, _ = Q.similarity_search(s, t, cfg)
    return torch.cat([M, torch.eye(3).expand(len(s), 1, 3, 3)], 1).reshape(-1, 3, 3)  # 7 a pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", required=True, choices=["score", "canvases", "refine", "converge", "blur", "round1"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = Q.SearchConfig()
    if a.part == "score":  # 32 cross pairs x 7 candidates at 128 px, n pairs a chunk
        s, t = pairs("cross", 32)
        M = candidates(s, t, cfg)
        for n in (32, 16, 8, 4, 2, 1):
            Q._CHUNK_NUMBERS["cpu"] = n * 7 * (cfg.bins + 2) * 128 * 128
            print("pairs a chunk", n, f"{timed(lambda: Q._score(s, t, M, 128, cfg), 32):.1f} ms a pair")
    elif a.part == "canvases":  # the similarity search of 8 cross pairs, n of its 63 canvases a chunk
        s, t = pairs("cross", 8)
        Q.similarity_search(s[:1], t[:1], cfg)
        for n in (63, 32, 16, 9, 7, 4):
            Q._CHUNK_NUMBERS["cpu"] = n * (cfg.bins + 2) * 112 * 112
            print("canvases a chunk", n, f"{timed(lambda: Q.similarity_search(s, t, cfg), 8):.1f} ms a pair")
    elif a.part == "refine":  # the refinement of 32 pairs from the search's answers, alternating
        for kind in ("same", "cross"):
            s, t = pairs(kind, 32)
            M = Q.global_search(s, t, cfg, generator=torch.Generator().manual_seed(0))[0][:, 0]
            for _ in range(2):
                for tol in (0.0, 1e-3):
                    c = replace(cfg, refine_tol=tol)
                    print(kind, "refine_tol", tol, f"{timed(lambda: Q.refine_homography(s, t, M, c), 32):.1f} ms a pair")
    elif a.part == "converge":  # every iteration run (refine_tol 0): px a corner moves, median and max over pairs
        for kind in ("same", "cross"):
            s, t = pairs(kind, 32)
            M = Q.global_search(s, t, cfg, generator=torch.Generator().manual_seed(0))[0][:, 0]
            moves = []
            real = Q.corner_distance

            def record(A, B):
                d = real(A, B)
                if d.shape == (len(s),):  # the refinement's step test (one row a pair)
                    moves.append(d.clone())
                return d

            Q.corner_distance = record
            try:
                Q._CHUNK_NUMBERS["cpu"] = 1 << 40  # one chunk: a row a pair
                Q.refine_homography(s, t, M, replace(cfg, refine_tol=0.0))
            finally:
                Q.corner_distance = real
            for (longer, iters), part in zip(cfg.refine, torch.stack(moves, 1).split([n for _, n in cfg.refine], 1)):
                px = part * ((longer - 1) / 2)
                print(kind, longer, "px: median", [round(float(v), 4) for v in px.median(0).values],
                      "max", [round(float(v), 3) for v in px.max(0).values])
    elif a.part == "blur":  # one chunk of 7 canvases' 8 bins at 112 px, sigma 1.5, 10 calls
        x = torch.randn(7, 8, 112, 112)
        k = gauss_kernel(1.5, x)
        r = k.numel() // 2

        def conv(x):
            N, C, H, W = x.shape
            y = F.pad(x.reshape(N * C, 1, H, W), (r, r, r, r), mode="replicate")
            return F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).view(N, C, H, W)

        def shifts(x):
            H, W = x.shape[-2:]
            p = F.pad(x, (r, r, 0, 0), mode="replicate")
            y = sum(float(k[i]) * p[..., :, i:i + W] for i in range(2 * r + 1))
            p = F.pad(y, (0, 0, r, r), mode="replicate")
            return sum(float(k[i]) * p[..., i:i + H, :] for i in range(2 * r + 1))

        for _ in range(2):
            for name, f in (("banded products", lambda: Q._blur(x, 1.5)), ("shifted sums", lambda: shifts(x)),
                            ("1-channel conv2d", lambda: conv(x))):
                print(name, f"{timed(lambda: [f() for _ in range(10)], 10):.2f} ms a call")
    else:  # round 1 (128 px, 5 x 5 blocks, radius 8) of 8 cross pairs' 7 candidates, kk candidates a call
        s, t = pairs("cross", 8)
        M = candidates(s, t, cfg)
        longer, grid, block, radius = cfg.rounds[1]
        st = Q._level_size(tuple(s.shape[-2:]), longer)
        b, origins = Q._block_origins(st, block, grid)

        def run(kk):
            for p in range(8):
                for k0 in range(0, 7, kk):
                    Q._block_shifts(s[p:p + 1], t[p:p + 1], M[p * 7 + k0:p * 7 + min(k0 + kk, 7)], st, st,
                                    origins, b, radius, cfg)

        for kk in (7, 4, 2, 1):
            print("candidates a call", kk, f"{timed(lambda: run(kk), 8):.1f} ms a pair")


if __name__ == "__main__":
    main()
