"""Registry of alignment methods (timm-style ``register`` / ``create``).

Every method takes the working-size image stack and returns one backward
warp per image, ``in_from_out_norm`` (see :mod:`models.geometry`), plus,
when it learns one, an :class:`Aligner` that maps *new* images to warps in
one call and can be saved and loaded by :mod:`models.pipeline`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch

__all__ = [
    "Progress",
    "Cancelled",
    "FitContext",
    "FitResult",
    "Aligner",
    "AlignmentMethod",
    "register_method",
    "create_method",
    "list_methods",
    "load_aligner",
    "register_aligner",
    "shard_bounds",
]


@dataclass
class Progress:
    """One progress report; what the worker forwards to the API."""

    stage: str  # "loading", "training", "aligning", "writing", "done"
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    apsnr: float | None = None  # running APSNR of the aligned batch, dB
    eta_s: float | None = None
    message: str | None = None


class Cancelled(Exception):
    """Raised inside a fit when ``should_stop()`` turns true."""


@dataclass
class FitContext:
    """Everything a method needs besides the images."""

    warp: str = "homography"
    reference_index: int | None = None  # None: the method's documented rule
    seed: int = 0
    budget: int | None = None  # epochs / outer iterations; None: method default
    progress: Callable[[Progress], None] | None = None
    checkpoint_dir: Path | None = None  # where to write/resume checkpoints
    should_stop: Callable[[], bool] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # method-specific
    # A distributed fit (torch.distributed initialised by the launcher): this process's rank and
    # the number of processes; the images given to ``fit`` are this rank's equal, contiguous shard.
    rank: int = 0
    world: int = 1
    n_total: int | None = None  # images over every shard (None: this process's own)

    @property
    def shard_start(self) -> int:
        """Global index of this process's first image (:func:`shard_bounds`)."""
        return 0 if self.world <= 1 else shard_bounds(self.n_total, self.world)[self.rank]

    def report(self, p: Progress) -> None:
        if self.progress is not None:
            self.progress(p)

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled")


def shard_bounds(n: int, world: int) -> list[int]:
    """How a distributed job splits ``n`` images: process ``r`` holds the contiguous range
    ``[b[r], b[r + 1])`` of the returned ``b`` (``world + 1`` entries); sizes differ by at most one."""
    return [r * n // world for r in range(world)] + [n]


class Aligner(Protocol):
    """A trained aligner: new images -> warps, without re-fitting."""

    method: str

    def align(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` working-size images -> ``(B, 3, 3)`` ``in_from_out_norm``."""

    def save(self, model_dir: Path) -> None:
        """Write ``config.json`` (with a ``"method"`` key) and ``*.safetensors``."""


@dataclass
class FitResult:
    in_from_out_norm: torch.Tensor  # (N, 3, 3), float32, CPU
    reference_index: int | None = None
    aligner: Aligner | None = None
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: dict | None = None  # the training schedule chosen (models.schedule.Plan.to_dict())


class AlignmentMethod(Protocol):
    name: ClassVar[str]

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        """``images``: ``(N, C, H, W)`` float in [0, 1] on the target device."""


_METHODS: dict[str, Callable[..., AlignmentMethod]] = {}
# Other kinds of task (kind -> name -> factory): "pair" methods align two images (models.pairwise).
_KINDS: dict[str, dict[str, Callable]] = {"collection": _METHODS}
_ALIGNER_LOADERS: dict[str, Callable[[Path, torch.device], Aligner]] = {}


def register_method(name: str, kind: str = "collection"):
    def deco(factory):
        _KINDS.setdefault(kind, {})[name] = factory
        return factory

    return deco


def register_aligner(method: str):
    """Register ``loader(model_dir, device) -> Aligner`` for a method's saved models."""

    def deco(loader):
        _ALIGNER_LOADERS[method] = loader
        return loader

    return deco


def _ensure_builtin() -> None:
    # Importing the modules runs their @register_method decorators (imported here, not at
    # the top, because they import this module).
    from . import baselines, dprc  # noqa: F401
    from .pairwise import classic, learned  # noqa: F401  (kind "pair")


def list_methods(kind: str = "collection") -> list[str]:
    _ensure_builtin()
    return sorted(_KINDS.get(kind, {}))


def create_method(name: str, kind: str = "collection", **kwargs):
    _ensure_builtin()
    methods = _KINDS.get(kind, {})
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(methods))}")
    return methods[name](**kwargs)


def load_aligner(model_dir: str | Path, device: torch.device | str = "cpu") -> Aligner:
    """Load a saved aligner; reads JSON and safetensors only, never pickles."""
    _ensure_builtin()
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    try:
        method = json.loads(cfg_path.read_text())["method"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg_path}: unreadable model config ({e})") from None
    if method not in _ALIGNER_LOADERS:
        raise ValueError(f"{model_dir}: method {method!r} has no saved-model support")
    return _ALIGNER_LOADERS[method](model_dir, torch.device(device))
