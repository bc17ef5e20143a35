"""The two networks of Deep Penalised Reconstruction Congealing.

* :class:`DeSTNet` — the densely fused spatial transformer (Annunziata et al.,
  BMVC 2018) used as the aligner.
* :class:`PenalisedAutoEncoder` — the low-capacity auto-encoder whose sigmoid
  code carries the positional penalty ``w^T z`` with ``w_l = l^k / sum_l l^k``.

Table 1 of the DPRC paper gives the layer lists; :data:`PRESETS` holds them.
Where the table is terse we made these readings (and say so in the docs):
``conv1-N`` on a spatial map that the paper feeds a vector is a fully
connected layer on the flattened map; every aligner stage ends in a linear
regressor to the warp's parameters, zero-initialised so the stage starts at
the identity; the decoder's ``conv1-S`` seed is reshaped to ``S`` channels at
1/8 of the working size and upsampled by the three stride-2 layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import geometry as G

__all__ = ["DeSTNetConfig", "AutoEncoderConfig", "PRESETS", "DeSTNet", "PenalisedAutoEncoder",
           "positional_weights", "set_compute_dtype", "conv_relu_pool", "conv_relu_pool_s2d",
           "conv_pool_bias_relu", "s2d_weight"]


def _compute(x: torch.Tensor, dtype: torch.dtype | None):
    """Autocast the network arithmetic to ``dtype`` (None: the input's own precision).

    Only the convolutions and linear layers run in the lower precision; every warp,
    homography and sampling grid stays in float32 outside these blocks (autocast would run
    their matrix products in bfloat16 too, which moves sampling points by ~0.05 px at 28 px).
    """
    # No weight-cast cache: its casts would outlive a captured CUDA graph's memory pool.
    return torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                          cache_enabled=False)


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Run every DeSTNet stage and auto-encoder inside ``module`` with ``dtype`` arithmetic
    (``torch.bfloat16`` on GPUs; None: float32). An execution setting, not part of the saved
    architecture: a model trained in bfloat16 loads and runs in float32 and vice versa."""
    for m in module.modules():
        if isinstance(m, (_Stage, PenalisedAutoEncoder)):
            m.compute_dtype = dtype
    return module


@dataclass(frozen=True)
class DeSTNetConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    warp: str = "homography"
    stages: int = 4
    # (kernel, channels, stride) of each conv of a stage; each is followed by ReLU and,
    # for stride 1, a 2x2 max-pool (IC-STN / DeSTNet MNIST practice).
    convs: tuple[tuple[int, int, int], ...] = ((7, 4, 1), (7, 8, 1))
    hidden: int = 48  # width of the regressor's hidden layer (0: none)
    fusion_dim: int = 32  # expansion rate k^F of the fusion
    stage_size: int = 0  # side the stage input is resized to (0: the working size)
    bound: float = 0.0  # >0: fused parameters are soft-bounded to +-bound (b tanh(p / b))


@dataclass(frozen=True)
class AutoEncoderConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    conv_channels: int = 100  # [conv3-C*] x 3
    fc: int = 1024  # [conv1-fc] x fc_layers
    fc_layers: int = 2
    code: int = 64  # |z|
    seed_channels: int = 16  # decoder conv1-S seed
    k: int = 1  # positional penalty exponent


PRESETS: dict[str, dict] = {
    # Table 1, MNIST column; DeSTNet-4 with k^F = 32.
    "mnist": {
        "destnet": dict(stages=4, convs=((7, 4, 1), (7, 8, 1)), hidden=48, fusion_dim=32),
        "ae": dict(conv_channels=100, fc=1024, fc_layers=2, seed_channels=16),
    },
    # The MNIST aligner with a narrower auto-encoder: ~20x cheaper on a CPU, for
    # tests, demos and CPU-only machines. Not a paper setting.
    "small": {
        "destnet": dict(stages=4, convs=((7, 4, 1), (7, 8, 1)), hidden=48, fusion_dim=32),
        "ae": dict(conv_channels=24, fc=256, fc_layers=2, seed_channels=16),
    },
    # Table 1, LFW column; DeSTNet-5.
    "lfw": {
        "destnet": dict(stages=5, convs=((3, 64, 2), (3, 128, 2), (3, 256, 2)), hidden=0,
                        fusion_dim=32, stage_size=64),
        "ae": dict(conv_channels=128, fc=512, fc_layers=2, seed_channels=48),
    },
}


def conv_relu_pool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, w, b, padding=k // 2)), 2, ceil_mode=True)``: a stage's block as written.

    ``x`` ``(B, C, H, W)``, ``w`` ``(O, C, k, k)`` with ``k`` odd; returns ``(B, O, ceil(H/2), ceil(W/2))``.
    """
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2)), 2, ceil_mode=True)


def s2d_weight(w: torch.Tensor) -> torch.Tensor:
    """``(O, C, k, k)`` -> ``(4 O, 4 C, K, K)``, ``K = (k + 2) // 2``: the kernel that computes the
    four output phases of a stride-1 convolution from its 2x2 space-to-depth input.

    Output channel ``4 o + 2 p + q`` is output pixel ``(2a + p, 2b + q)`` of channel ``o``; input
    channel ``4 c + 2 r + t`` is ``pixel_unshuffle``'s; tap ``(m, n)`` of it is original tap
    ``(2m + r - p, 2n + t - q)``, zero where that falls outside ``[0, k)``. One gather from the
    flattened kernel with a zero appended (few operations: it runs at every stage's every call).
    """
    O, C, k, _ = w.shape
    K = (k + 2) // 2
    idx = _s2d_index(k, w.device)  # (4 * 4 * K * K,) into the k * k taps and the zero after them
    t = F.pad(w.reshape(O, C, k * k), (0, 1)).index_select(2, idx).view(O, C, 4, 4, K, K)
    return t.transpose(1, 2).reshape(O * 4, C * 4, K, K)  # (o, p, q) x (c, r, t): a view when C == 1


_S2D_INDEX: dict[tuple[int, str], torch.Tensor] = {}


def _s2d_index(k: int, device: torch.device) -> torch.Tensor:
    # Made once per kernel size and device, outside any captured CUDA graph (its first use is an
    # eager step); a lookup afterwards.
    key = (k, str(device))
    if key not in _S2D_INDEX:
        K = (k + 2) // 2
        e = torch.arange(2 * K)  # taps 2m + r of one input phase, in (m, r) order below
        u = e.view(K, 2).T.reshape(2, 1, K)  # (r, 1, m): 2m + r
        rows = u - torch.arange(2).view(1, 2, 1)  # (r, p, m): 2m + r - p
        ok = (rows >= 0) & (rows < k)
        r_ = rows.permute(1, 0, 2)  # (p, r, m)
        ok_ = ok.permute(1, 0, 2)
        # (p, q, r, t, m, n) -> flat tap index, or k * k (the appended zero) outside the kernel
        flat = r_[:, None, :, None, :, None] * k + r_[None, :, None, :, None, :]
        inside = ok_[:, None, :, None, :, None] & ok_[None, :, None, :, None, :]
        _S2D_INDEX[key] = torch.where(inside, flat, k * k).reshape(-1).to(device)
    return _S2D_INDEX[key]


def conv_relu_pool_s2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:func:`conv_relu_pool` for even ``H`` and ``W``, computed on the 2x2 space-to-depth input.

    One convolution with 4x the channels on each side (:func:`s2d_weight`) gives the four output
    pixels that each 2x2 pool window holds as four channels, and the pool is their maximum (ReLU
    and max commute; the bias is added after it). The same function to float rounding; on a
    1-channel input cuDNN's kernels, which pad 1 channel to 8 for the tensor cores, get 4 real
    ones. Ties between phases (a flat background) may route the gradient to another phase than
    the 2x2 max-pool's: an equally valid subgradient.
    """
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    if H % 2 or W % 2 or k % 2 == 0:
        raise ValueError(f"space-to-depth block needs even sides and an odd kernel, got {H}x{W}, k={k}")
    P, K = k // 2, (k + 2) // 2
    # P zeros before; after, enough that each side is 2 (H/2 + K - 1): every phase's K taps exist
    xp = F.pad(x, (P, 2 * (W // 2 + K - 1) - W - P, P, 2 * (H // 2 + K - 1) - H - P))
    y = F.conv2d(F.pixel_unshuffle(xp, 2), s2d_weight(w))  # (B, 4 O, H/2, W/2)
    # the maximum over each channel's four phases as a (4, 1) max-pool: one kernel each way
    y = F.max_pool2d(y.view(B, O, 4, (H // 2) * (W // 2)), (4, 1)).view(B, O, H // 2, W // 2)
    return _bias_relu(y, b)


def conv_pool_bias_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:func:`conv_relu_pool` with the bias added after the pool (on a quarter of the values)."""
    return _bias_relu(F.max_pool2d(F.conv2d(x, w, padding=w.shape[-1] // 2), 2, ceil_mode=True), b)


def _bias_relu(y: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # ReLU(max(y) + b) = max(ReLU(y + b)) for a per-channel b: cuDNN adds a convolution's bias as a
    # pass of its own over the whole output, here over the pooled one.
    return (y if b is None else y + b.to(y.dtype).view(1, -1, 1, 1)).relu()


# A stage's conv -> ReLU -> max-pool blocks whose convolution reads at most this many channels
# (the input layer) run on the space-to-depth input (conv_relu_pool_s2d; 0: none). Read at each
# call, so a benchmark can switch it.
S2D_MAX_IN_CHANNELS = 3


class _Stage(nn.Module):
    """One DeSTNet stage: image -> parameter update, zero at initialisation."""

    def __init__(self, cfg: DeSTNetConfig, dof: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = cfg.in_channels
        h, w = (cfg.stage_size, cfg.stage_size) if cfg.stage_size else cfg.image_size
        self.size = (h, w)
        for k, ch, s in cfg.convs:
            layers += [nn.Conv2d(c, ch, k, stride=s, padding=k // 2), nn.ReLU(inplace=True)]
            h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
            if s == 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                h, w = (h + 1) // 2, (w + 1) // 2
            c = ch
        self.features = nn.Sequential(*layers)
        flat = c * h * w
        head: list[nn.Module] = []
        if cfg.hidden:
            head += [nn.Linear(flat, cfg.hidden), nn.ReLU(inplace=True)]
            flat = cfg.hidden
        self.out = nn.Linear(flat, dof)
        nn.init.zeros_(self.out.weight)  # identity at initialisation
        nn.init.zeros_(self.out.bias)
        self.head = nn.Sequential(*head)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=True, antialias=True)
        with _compute(x, self.compute_dtype):
            f = self._features(x).flatten(1)  # (B, c*h*w)
            p = self.out(self.head(f))  # (B, dof)
        return p.float()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        mods, i = self.features, 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Conv2d) and i + 2 < len(mods) and isinstance(mods[i + 2], nn.MaxPool2d):
                s2d = (m.in_channels <= S2D_MAX_IN_CHANNELS and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0)
                x = (conv_relu_pool_s2d if s2d else conv_pool_bias_relu)(x, m.weight, m.bias)
                i += 3
            else:
                x = m(x)
                i += 1
        return x


class DeSTNet(nn.Module):
    """Densely fused spatial transformer network.

    Stage ``i`` sees the *original* image resampled once by the current warp
    and predicts an update ``dp_i``. The fusion expands every update to
    ``fusion_dim`` features (``E_i``) and contracts the concatenation of all
    expanded updates so far (``C_i``) into the stage's fused parameters
    ``p_i = C_i([E_1 dp_1, ..., E_i dp_i])``. ``E`` and ``C`` are initialised
    so that ``p_i = dp_1 + ... + dp_i`` (an additive cascade), and learn from
    there; with zero-initialised stage heads the whole network starts at the
    identity.

    ``forward(x, base)`` returns ``in_from_out_norm = base @ M(p_F)`` with
    ``base`` an optional fixed initial warp (identity by default).
    """

    def __init__(self, cfg: DeSTNetConfig):
        super().__init__()
        self.cfg = cfg
        self.family = G.get_family(cfg.warp)
        dof, k = self.family.dof, cfg.fusion_dim
        if k < dof:
            raise ValueError(f"fusion_dim {k} must be at least the warp's {dof} parameters")
        self.stages = nn.ModuleList(_Stage(cfg, dof) for _ in range(cfg.stages))
        self.expand = nn.ModuleList(nn.Linear(dof, k, bias=False) for _ in range(cfg.stages))
        self.contract = nn.ModuleList(nn.Linear(k * (i + 1), dof, bias=False) for i in range(cfg.stages))
        with torch.no_grad():
            for i in range(cfg.stages):
                e = torch.zeros(k, dof)
                e[:dof] = torch.eye(dof)
                # Small noise on the unused expanded features lets the fusion learn;
                # it cannot change p at initialisation because C reads only the first dof.
                e[dof:] = 0.01 * torch.randn(k - dof, dof)
                self.expand[i].weight.copy_(e)
                c = torch.zeros(dof, k * (i + 1))
                for j in range(i + 1):
                    c[:, j * k:j * k + dof] = torch.eye(dof)
                self.contract[i].weight.copy_(c)

    def _to_matrix(self, p: torch.Tensor) -> torch.Tensor:
        # Homographies are predicted as corner offsets (4-point parametrisation);
        # the other families' normalised parameters are already balanced.
        if self.cfg.warp == "homography":
            return G.offsets_to_homography(p)
        return G.params_to_matrix(p, self.cfg.warp)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None,
                limit: str | torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, C, H, W)`` working-size images.
            base: ``(B, 3, 3)`` initial ``in_from_out_norm`` (identity if None).
            limit: a less general warp family to project every stage's warp onto
                (the warp curriculum): its name, or its rank as a 0-d tensor (so that a
                captured CUDA graph can change it between replays), or None for the
                network's own family.
        Returns:
            ``(B, 3, 3)`` ``in_from_out_norm``.
        """
        B = x.shape[0]
        size = tuple(x.shape[-2:])
        feats: list[torch.Tensor] = []
        M = base
        for i, stage in enumerate(self.stages):
            # Stage 0 sees the input as it is when there is no base warp; every other stage
            # resamples the original image once through the current warp.
            xi = x if M is None else G.warp(x, M, size)
            feats.append(self.expand[i](stage(xi)))
            p = self.contract[i](torch.cat(feats, dim=1))
            if self.cfg.bound > 0:
                p = self.cfg.bound * torch.tanh(p / self.cfg.bound)
            if self.cfg.warp == "homography":
                # The curriculum's projection is made on the corner offsets: one small product
                # whatever the family, where projecting the matrix costs ~30 kernels per family.
                R = G.offsets_to_homography(G.project_offsets(p, limit))
            else:
                R = _project(self._to_matrix(p), limit, self.family)
            M = R if base is None else base @ R
        if M is None:  # no stages
            M = torch.eye(3, dtype=x.dtype, device=x.device).expand(B, 3, 3) if base is None else base
        return M


def _project(R: torch.Tensor, limit: str | torch.Tensor | None, family: G.WarpFamily) -> torch.Tensor:
    """``R`` ``(B, 3, 3)`` projected onto the family ``limit`` (by name or 0-d rank tensor)."""
    if limit is None:
        return R
    if isinstance(limit, str):
        if limit == family.name:
            return R
        return G.params_to_matrix(G.matrix_to_params(R, limit), limit)
    out = R
    for name in G.FAMILIES_BY_RANK[:family.rank]:
        # Selected on the device: every projection is computed (3x3 matrices, cheap) and the
        # one whose rank equals ``limit`` kept; ranks at or above the family's keep R.
        proj = G.params_to_matrix(G.matrix_to_params(R, name), name)
        out = torch.where(limit == G.WARP_FAMILIES[name].rank, proj, out)
    return out


def positional_weights(b: int, k: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """``w_l = l^k / sum_{l=1}^b l^k`` for ``l = 1..b``, ``(b,)``."""
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    l = torch.arange(1, b + 1, **kw).double().pow(k)
    return (l / l.sum()).to(**kw) if kw else (l / l.sum()).float()


class PenalisedAutoEncoder(nn.Module):
    """Low-capacity auto-encoder with a sigmoid code (Table 1, tanh between layers).

    ``forward(x)`` returns ``(reconstruction (B, C, H, W), z (B, code))``.
    """

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        H, W = cfg.image_size
        c = cfg.in_channels
        enc: list[nn.Module] = []
        for _ in range(3):
            enc += [nn.Conv2d(c, cfg.conv_channels, 3, stride=2, padding=1), nn.Tanh()]
            c = cfg.conv_channels
        self.encoder_conv = nn.Sequential(*enc)
        self.h8, self.w8 = -(-H // 8), -(-W // 8)
        flat = c * self.h8 * self.w8
        fcs: list[nn.Module] = []
        d = flat
        for _ in range(cfg.fc_layers):
            fcs += [nn.Linear(d, cfg.fc), nn.Tanh()]
            d = cfg.fc
        fcs += [nn.Linear(d, cfg.code), nn.Sigmoid()]
        self.encoder_fc = nn.Sequential(*fcs)
        dec: list[nn.Module] = []
        d = cfg.code
        for _ in range(cfg.fc_layers):
            dec += [nn.Linear(d, cfg.fc), nn.Tanh()]
            d = cfg.fc
        dec += [nn.Linear(d, cfg.seed_channels * self.h8 * self.w8), nn.Tanh()]
        self.decoder_fc = nn.Sequential(*dec)
        up: list[nn.Module] = []
        c = cfg.seed_channels
        for _ in range(3):
            up += [nn.ConvTranspose2d(c, cfg.conv_channels, 3, stride=2, padding=1, output_padding=1), nn.Tanh()]
            c = cfg.conv_channels
        up += [nn.Conv2d(c, cfg.in_channels, 1), nn.Sigmoid()]
        self.decoder_conv = nn.Sequential(*up)
        self.register_buffer("w", positional_weights(cfg.code, cfg.k), persistent=False)
        self.compute_dtype: torch.dtype | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder_conv(x).flatten(1)  # (B, C*h8*w8): stride-2 convs give ceil(H/8)
        return self.encoder_fc(f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        s = self.decoder_fc(z).view(-1, self.cfg.seed_channels, self.h8, self.w8)  # (B, S, H/8, W/8)
        y = self.decoder_conv(s)  # (B, C, 8*h8, 8*w8)
        H, W = self.cfg.image_size
        return y[..., :H, :W]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _compute(x, self.compute_dtype):
            z = self.encode(x)
            r = self.decode(z)
        return r.float(), z.float()

    def penalty(self, z: torch.Tensor) -> torch.Tensor:
        """``w^T z`` per image, ``(B,)``."""
        return z @ self.w.to(z.dtype)
