"""DPRC's training loop: the objective of one batch, and a step runner fast at every size.

Where a step's time goes decides the structure (profiles in ``docs/research/speed.md``):

* **Blocks of steps.** Everything a step needs that is random or scheduled (its batch's image
  indices, the equivariance views' corner noise, the learning rate, the blur width, the warp
  family, the gate of C's gradient) is computed on the host for a block of ``K`` steps, as a
  function of the absolute step number and the seed, and copied to the device once per block.
  Inside a block the device never waits for the host, a resumed job draws exactly what an
  uninterrupted one would, and the same tables drive the CPU, one GPU and several.
* **One captured CUDA graph** (single GPU): the whole step, forward, backward, the finiteness
  guard and the fused Adam update, is captured once and replayed; a step counter on the device
  selects the block's row. A 28 px step is a few hundred small kernels, so launch latency, not
  arithmetic, is what graphs remove. Capture failure falls back to eager steps with a note.
* **No host sync per step.** A step whose loss or gradient is not finite is skipped on the
  device (fused Adam's ``found_inf``: parameters, moments and step count untouched); the host
  reads the block's losses and skip flags at the block's end.
* **Batched views.** The equivariance views go through the DeSTNet in the same call as the batch.
* **Data on the device as uint8**, gathered by index inside the step.

Distributed (``world > 1``): the objective runs inside ``DistributedDataParallel``; each process
trains on its own shard with its share of the batch, gradients are averaged by DDP, and the
skip decision is the same on every process (an all-reduce of the flag).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.optim.adam import adam

from . import geometry as G
from .imageops import blur, blur_radius
from .schedule import Plan

__all__ = ["MAX_BAD_STEPS", "TrainData", "Objective", "equivariance_distance", "distance", "Tables", "make_tables",
           "StepRunner", "FusedAdam", "make_optimizer", "guarded_update", "as_float", "curriculum_rank", "curriculum_limit"]

# This many skipped steps in a row means the parameters themselves are broken: the fit stops.
MAX_BAD_STEPS = 20


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0-255) or float images (0-1) -> float32 in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def curriculum_limit(family: str, rank: int) -> str | None:
    """The family a curriculum rank limits ``family`` to, or None when it is no limit."""
    return None if rank >= G.get_family(family).rank else G.FAMILIES_BY_RANK[rank]


def curriculum_rank(family: str, frac: float, schedule) -> int:
    """Rank of the family training is limited to at progress ``frac`` (the family's own rank: no limit)."""
    unlocked = max(i for i, t in enumerate(schedule) if frac >= t)
    return min(unlocked, G.get_family(family).rank)


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """The images a process trains on: ``x`` ``(N, C, H, W)`` (uint8 or float) and their
    backgrounds ``bg`` ``(N, C, 1, 1)`` float, both on the training device."""

    x: torch.Tensor
    bg: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return as_float(self.x.index_select(0, idx)), self.bg.index_select(0, idx)


class _IndexStream:
    """Image indices in the order training visits them: epoch ``e`` is a permutation of ``0..N-1``
    drawn from ``seed``; batches run on across epoch boundaries, so every batch is full. With
    ``pool`` (a ``(K,)`` index tensor) training visits only those images: the permutations are of
    ``0..K-1``, mapped through ``pool``."""

    def __init__(self, n: int, seed: int, pool: torch.Tensor | None = None):
        self.pool = pool
        self.n, self.seed = (n if pool is None else len(pool)), seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, e: int) -> torch.Tensor:
        if e != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            self._epoch, self._perm = e, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, start: int, count: int) -> torch.Tensor:
        out, pos = [], start
        while count > 0:
            e, off = divmod(pos, self.n)
            part = self._perm_of(e)[off:off + count]
            out.append(part)
            pos, count = pos + len(part), count - len(part)
        idx = torch.cat(out)
        return idx if self.pool is None else self.pool[idx]


# --------------------------------------------------------------------------- objective


class Objective(nn.Module):
    """Eq. 8's ``D + lambda C`` plus the equivariance loss for one batch.

    One module holding both networks, so that ``DistributedDataParallel`` can wrap the whole
    objective. ``sigma`` (blur, pixels), ``limit`` (warp family) and ``c_gate`` (whether C's
    gradient reaches the aligner) are Python values in eager steps and 0-d tensors inside a
    captured graph. ``noise`` ``(B, Z)`` holds each image's equivariance-view draws.
    """

    def __init__(self, aligner, ae: nn.Module, cfg, ref_img: torch.Tensor, ref_bg: torch.Tensor,
                 ref_c: torch.Tensor, ref_r: torch.Tensor, blur_px: float):
        super().__init__()
        self.net = aligner.net
        self.ae = ae
        self.aligner = aligner  # not a Module: its net is registered above
        self.cfg = cfg
        self.register_buffer("ref_img", ref_img)
        self.register_buffer("ref_bg", ref_bg)
        self.register_buffer("ref_c", ref_c)
        self.register_buffer("ref_r", ref_r)
        self.radius = max(1, int(math.ceil(3 * blur_px)))

    def _blur(self, x, sigma):
        return blur(x, sigma) if not torch.is_tensor(sigma) else blur_radius(x, sigma, self.radius)

    def forward(self, xb, bgb, noise, sigma, limit, c_gate):
        """Returns ``(loss, terms, aligned)``: the loss to minimise, ``(3,)`` detached ``D, C, E``,
        and the batch's aligned images (detached)."""
        from .dprc import moment_penalty

        cfg, al = self.cfg, self.aligner
        B, _, H, W = xb.shape
        pad = bgb if cfg.padding == "border" else None
        views, As = [], []
        if cfg.equivariance > 0 and cfg.equivariance_frame in ("input", "both"):
            P = _views(noise[:, :10], cfg.equivariance_sigma, (H, W))
            views.append(_warp_bg(xb, P, pad))
            As.append(P)
        M_all = al.warps(torch.cat([xb, *views]) if views else xb, limit)  # the batch and its views at once
        Mb = M_all[:B]
        aligned = _warp_bg(xb, Mb, pad)
        E = xb.new_zeros(())
        if cfg.equivariance > 0:
            Mps = [M_all[B * (i + 1):B * (i + 2)] for i in range(len(views))]
            if cfg.equivariance_frame in ("aligned", "both"):
                # Views of each image's current aligned frame, perturbed by a size drawn per image.
                A = Mb.detach() @ _views(noise[:, 11:21], noise[:, 10] * cfg.aligned_sigma, (H, W))
                As.append(A)
                Mps.append(al.warps(_warp_bg(xb, A, pad), limit))
            E = equivariance_distance(As, Mps, Mb, cfg.equivariance_units)
        D = distance(cfg, xb, aligned, Mb, self.ref_img, self.ref_bg, lambda t: self._blur(t, sigma))
        if cfg.moment_weight > 0:
            D = D + cfg.moment_weight * moment_penalty(aligned, bgb, self.ref_c, self.ref_r)
        if cfg.lam > 0:
            # Early on the auto-encoder reconstructs nothing well and an empty image is the
            # cheapest to reconstruct: C alone would shrink the images. So C trains the AE from
            # the start and reaches the aligner only once ``c_gate`` opens.
            if torch.is_tensor(c_gate):
                a = aligned.detach() + c_gate * (aligned - aligned.detach())
            else:
                a = aligned if c_gate else aligned.detach()
            recon, z = self.ae(a)
            Cterm = (recon - a).abs().mean() + cfg.gamma * self.ae.penalty(z).mean()
        else:  # D only (the paper's ablation): the auto-encoder costs nothing
            Cterm = xb.new_zeros(())
        loss = D + cfg.lam * Cterm + cfg.equivariance * E
        if cfg.zoom_anchor > 0:
            loss = loss + cfg.zoom_anchor * zoom_drift(Mb, al.base(xb, search=False)).pow(2)
        return loss, torch.stack([D, Cterm, E]).detach(), aligned.detach()


def zoom_drift(M: torch.Tensor, M0: torch.Tensor | None) -> torch.Tensor:
    """The batch mean of ``log(area(M) / area(M0))``: how far the aligned frames (``(B, 3, 3)``
    ``in_from_out_norm``) have zoomed out (> 0) or in (< 0) from their initial warps, in log area
    (``M0`` None: the identity's). The area is the output frame's quadrilateral in the input."""
    c = G.unit_corners(like=M)
    a = G.polygon_area(G.transform_points(M, c)).abs().clamp_min(1e-6)
    a0 = 4.0 if M0 is None else G.polygon_area(G.transform_points(M0.detach(), c)).abs().clamp_min(1e-6)
    return torch.log(a / a0).mean()


def equivariance_distance(As: list[torch.Tensor], Mps: list[torch.Tensor], Mb: torch.Tensor,
                          units: str = "input") -> torch.Tensor:
    """The self-supervised equivariance loss from views and their warps.

    For a view ``x'(q) = x(A q)`` a consistent aligner satisfies ``A M(x') = M(x)`` (both map
    the aligned frame onto ``x``). The loss is the mean distance between the two maps at the
    output frame's corners, in normalised input units, or with ``units == "frame"`` divided by
    each aligned frame's linear size in the input (then a common zoom does not lower it: in
    input units zooming into the object shrinks every distance, so the loss itself rewards
    cropping; round 9 in docs/research). Summed over the kinds of view.

    Args:
        As: views' homographies, each ``(B, 3, 3)``; Mps: the aligner's warps of those views;
        Mb: ``(B, 3, 3)`` the warps of the images themselves.
    """
    c = G.unit_corners(like=Mb)
    target = G.transform_points(Mb, c)  # (B, 4, 2)
    if units == "frame":
        size = (G.polygon_area(target) / 4).clamp_min(1e-4).sqrt()
    else:
        size = torch.ones(Mb.shape[0], dtype=Mb.dtype, device=Mb.device)
    E = Mb.new_zeros(())
    for A_, Mp_ in zip(As, Mps):
        E = E + ((G.transform_points(A_ @ Mp_, c) - target).norm(dim=-1).mean(1) / size).mean()
    return E


def distance(cfg, xb, aligned, Mb, ref_img, ref_bg, blur_fn) -> torch.Tensor:
    """``D``: L1 between the aligned images and the reference, in the chosen frame(s).

    In the output frame (Eq. 5) input content that the aligned frame leaves out costs nothing,
    so zooming in on a part of the object is cheap. In the input frame the reference is warped
    onto each image instead (``warp(ref, M^-1)``), and every pixel of the input must be
    explained. ``blur_fn``: the coarse-to-fine blur at this step.
    """
    rb = blur_fn(ref_img)
    terms = []
    if cfg.distance in ("output", "symmetric"):
        terms.append((blur_fn(aligned) - rb).abs().mean())
    if cfg.distance in ("input", "symmetric"):
        pad = ref_bg if cfg.padding == "border" else None
        ref_in = _warp_bg(ref_img.expand(xb.shape[0], -1, -1, -1), G.invert(Mb), pad)
        terms.append((blur_fn(xb) - blur_fn(ref_in)).abs().mean())
    return sum(terms) / len(terms)


def _warp_bg(x: torch.Tensor, M_: torch.Tensor, bg: torch.Tensor | None) -> torch.Tensor:
    """Same-size warp; outside the input: ``bg`` ``(B, C, 1, 1)``, or 0 when None."""
    return G.warp(x, M_, tuple(x.shape[-2:]), fill=bg)


def _views(z: torch.Tensor, sigma, size: tuple[int, int]) -> torch.Tensor:
    """The perturbation protocol's homographies from standard normal draws ``z`` ``(B, 10)``
    (8 corner coordinates, then the common shift), normalised ``(B, 3, 3)``.

    Each pixel corner moves by ``N(0, (sigma W)^2)`` in x and ``(sigma H)^2`` in y plus one shift
    from the same law (:func:`models.perturb.random_perturbations`), here expressed directly in
    normalised units. ``sigma``: a number or ``(B,)``.
    """
    H, W = size
    scale = G.constant((W * 2.0 / max(W - 1, 1), H * 2.0 / max(H - 1, 1)), like=z)
    sig = sigma[:, None, None] if torch.is_tensor(sigma) else sigma
    d = (z[:, :8].view(-1, 4, 2) + z[:, 8:10].view(-1, 1, 2)) * scale * sig  # (B, 4, 2)
    return G.offsets_to_homography(d.reshape(-1, 8))


# --------------------------------------------------------------------------- tables


@dataclass
class Tables:
    """What ``k`` consecutive steps draw, computed on the host from the step numbers alone.

    ``idx`` ``(k, b)`` image indices (this process's batch share), ``noise`` ``(k, b, Z)``
    standard normal/uniform draws of the equivariance views, ``knobs`` ``(k, 4)``:
    learning rate, blur sigma (pixels), warp-family rank limit, C gate.
    """

    idx: torch.Tensor
    noise: torch.Tensor
    knobs: torch.Tensor


def noise_width(cfg) -> int:
    return 21 if cfg.equivariance_frame in ("aligned", "both") else 10


def make_tables(step0: int, k: int, plan: Plan, cfg, family: str, size: tuple[int, int],
                stream: _IndexStream, seed: int, rank: int, world: int) -> Tables:
    b = plan.batch_size // world
    idx = stream.take(step0 * b, k * b).view(k, b)
    Z = noise_width(cfg)
    noise = torch.empty(k, b, Z)
    knobs = torch.empty(k, 4)
    H, W = size
    for j in range(k):
        s = step0 + j
        g = torch.Generator().manual_seed((seed * 7919 + s) * world + rank)
        noise[j, :, :8] = torch.randn(b, 8, generator=g)
        noise[j, :, 8:10] = torch.randn(b, 2, generator=g)
        if Z > 10:
            noise[j, :, 10] = torch.rand(b, generator=g)
            noise[j, :, 11:21] = torch.randn(b, 10, generator=g)
        frac = s / max(1, plan.steps)
        knobs[j, 0] = plan.lr_at(s)
        knobs[j, 1] = cfg.blur_start * min(H, W) * max(0.0, 1 - frac / max(cfg.blur_until, 1e-6))
        knobs[j, 2] = curriculum_rank(family, frac, cfg.curriculum)
        knobs[j, 3] = 1.0 if frac >= cfg.c_grad_from else 0.0
    return Tables(idx, noise, knobs)


# --------------------------------------------------------------------------- runner


@dataclass
class BlockResult:
    loss: list[float | None]  # per step; None where the step was skipped
    D: list[float | None]
    C: list[float | None]
    skipped: list[bool]
    last_aligned: torch.Tensor | None = None


@dataclass
class _Buffers:
    idx: torch.Tensor
    noise: torch.Tensor
    knobs: torch.Tensor
    counter: torch.Tensor
    out: torch.Tensor  # (K, 4): loss, D, C, skipped
    last: dict = field(default_factory=dict)


class StepRunner:
    """Runs DPRC training steps from :class:`Tables`, eagerly or as one captured CUDA graph.

    ``model`` is the :class:`Objective` or its ``DistributedDataParallel`` wrapper.
    """

    def __init__(self, model: nn.Module, objective: Objective, opt: FusedAdam,
                 params: list[torch.Tensor], data: TrainData, family: str, block: int, b: int,
                 noise_z: int, use_graph: bool, world: int = 1, notes: list[str] | None = None,
                 knobs_on_device: bool | None = None):
        dev = data.x.device
        self.model, self.objective, self.opt, self.params, self.data = model, objective, opt, params, data
        self.family, self.block, self.world = family, block, world
        self.notes = notes if notes is not None else []
        self.use_graph = use_graph and dev.type == "cuda" and world == 1
        # On a GPU the knobs stay on the device (reading one on the host would sync every step).
        self.device_knobs = dev.type == "cuda" if knobs_on_device is None else knobs_on_device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buf = _Buffers(
            idx=torch.zeros(block, b, dtype=torch.long, device=dev),
            noise=torch.zeros(block, b, noise_z, device=dev),
            knobs=torch.zeros(block, 4, device=dev),
            counter=torch.zeros((), dtype=torch.long, device=dev),
            out=torch.zeros(block, 4, device=dev),
        )
        self.lr = opt.lr  # a tensor on the device (see make_optimizer)

    # One step, reading row ``counter`` of the block's tables. No host sync anywhere in it.
    def _step(self) -> None:
        bf = self.buf
        j = bf.counter.view(1)
        idx = bf.idx.index_select(0, j)[0]
        kn = bf.knobs.index_select(0, j)[0]
        xb, bgb = self.data.batch(idx)
        noise = bf.noise.index_select(0, j)[0]
        if self.device_knobs:
            sigma, limit, gate = kn[1], kn[2].round().long(), kn[3]
        else:  # CPU: the knobs as Python values (reading them costs nothing), so unused branches cost nothing
            k = kn.tolist()
            sigma, gate = k[1], k[3] > 0.5
            r = int(round(k[2]))
            limit = curriculum_limit(self.family, r)
        self.lr.copy_(kn[0])
        loss, terms, aligned = self.model(xb, bgb, noise, sigma, limit, gate)
        bad = guarded_update(loss, self.params, self.opt, self.world)
        bf.out.index_copy_(0, j, torch.cat([loss.detach().float().view(1), terms[:2].float(), bad.view(1)]).view(1, 4))
        bf.last["aligned"] = aligned
        bf.counter.add_(1)

    def _capture(self) -> None:
        """Warm up three eager steps on a side stream (allocator, cuDNN plans, Adam state),
        then capture one step. The warm-up steps are real steps of the block."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            self._step()
        self.graph = g

    def run(self, t: Tables, should_stop: Callable[[], None]) -> BlockResult:
        k = t.idx.shape[0]
        bf = self.buf
        bf.idx[:k].copy_(t.idx)
        bf.noise[:k].copy_(t.noise)
        bf.knobs[:k].copy_(t.knobs)
        bf.counter.zero_()
        done = 0
        if self.use_graph and self.graph is None and k >= 4:
            try:
                self._capture()
                done = 3
            except Exception as e:  # noqa: BLE001 - any capture failure: eager steps are still correct
                self.use_graph = False
                self.graph = None
                self.notes.append(f"CUDA graph capture failed ({type(e).__name__}: {e}); trained with eager steps")
                torch.cuda.synchronize()
                done = int(bf.counter.item())
        for _ in range(done, k):
            should_stop()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        out = bf.out[:k].cpu()  # the block's one sync
        skipped = (out[:, 3] > 0).tolist()
        vals = [[None if sk else v for v, sk in zip(out[:, c].tolist(), skipped)] for c in range(3)]
        return BlockResult(vals[0], vals[1], vals[2], skipped, bf.last.get("aligned"))


def guarded_update(loss: torch.Tensor, params: list[torch.Tensor], opt: FusedAdam,
                   world: int = 1) -> torch.Tensor:
    """Back-propagate ``loss`` and step ``opt``, unless the loss or the gradient is not finite.

    The decision is made on the device: ``opt`` is a :class:`FusedAdam` whose
    ``found_inf`` tensor, when nonzero, makes it leave the parameters, its moments and its step
    count untouched (the mechanism mixed-precision loss scaling uses). Nothing waits for the
    host. Returns the 0-d float flag (1: skipped). With ``world > 1`` every process takes the
    same decision.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    opt.found_inf.copy_(bad)
    opt.step()
    return bad


class FusedAdam:
    """Adam (no weight decay) through torch's fused kernel, ``torch.optim.adam.adam(fused=True)``:
    the update of ``torch.optim.Adam(params, fused=True, capturable=...)``, step for step.

    Not ``torch.optim.Adam`` itself because an ``Optimizer``'s first construction imports
    ``torch._dynamo`` (with sympy and FSDP: 1.2 s on a 2-core CPU, about 3 s on the GPU machines
    measured), which every job would pay at its start and nothing here uses. The state is
    ``torch.optim.Adam``'s: ``state[p] = {"step", "exp_avg", "exp_avg_sq"}``, made at
    construction (so a CUDA graph can capture the first step). ``lr`` is a 0-d device tensor the
    trainer overwrites; a nonzero ``found_inf`` makes a step leave parameters, moments and step
    counts untouched (the mechanism mixed-precision loss scaling uses).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, device: torch.device,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.capturable = device.type == "cuda"
        self.lr = torch.tensor(lr, device=device)
        self.found_inf = torch.zeros((), device=device)
        self.state = {p: {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                          "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                      for p in self.params}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none`` is accepted for ``torch.optim``'s signature; always true)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]  # as torch.optim.Adam: no gradient, no step
        if not ps:
            return
        st = [self.state[p] for p in ps]
        adam(ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [],
             [s["step"] for s in st], foreach=False, capturable=self.capturable, differentiable=False, fused=True,
             grad_scale=None, found_inf=self.found_inf, has_complex=False, amsgrad=False, beta1=self.betas[0],
             beta2=self.betas[1], lr=self.lr, weight_decay=0.0, eps=self.eps, maximize=False)


def make_optimizer(params: list[torch.Tensor], lr: float, device: torch.device) -> FusedAdam:
    """The trainer's optimiser: :class:`FusedAdam` (one kernel for every parameter; CPU and CUDA),
    capturable on CUDA so that a graph can hold its step, with the learning rate as a device tensor
    the steps overwrite."""
    return FusedAdam(params, lr, device)


def elapsed_eta(t0: float, done: int, remaining: int) -> float | None:
    dt = time.time() - t0
    return dt / done * remaining if done else None
