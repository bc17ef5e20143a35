"""The interface every alignment method implements, and the registry methods register in.

Every method takes the working-size image stack and returns one backward
warp per image, ``in_from_out_norm`` (see :mod:`models.geometry`), plus,
when it learns one, an :class:`Aligner` that maps *new* images to warps in
one call and can be saved and loaded by :mod:`models.pipeline`.

The registry is one-way: this module imports no method. A family registers itself when its
module is imported, and :mod:`models.catalog` imports every family the product ships and looks
names up (``create_method``, ``list_methods``, ``load_aligner``). How a new family registers:

1. in its module, decorate the factory (a class or function taking the method's options as
   keyword arguments) with ``@register_method("name")``; a method whose fit returns an
   :class:`Aligner` also registers ``@register_aligner("name")`` on
   ``loader(model_dir, device) -> Aligner`` (it reads what ``Aligner.save`` wrote, whose
   ``config.json`` carries ``"method": "name"``);
2. add ``from . import <family>`` to :mod:`models.catalog`.

``tests/core/test_methods.py`` then checks that the name resolves, and that the registry stays
free of import loops. A name may be registered once (registering the same factory again is a
no-op; another factory under a taken name is an error).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch

from .imageio import InputError

__all__ = [
    "Progress",
    "Cancelled",
    "AlignmentFailed",
    "FitContext",
    "FitResult",
    "Aligner",
    "AlignmentMethod",
    "register_method",
    "register_aligner",
    "registered_methods",
    "registered_aligners",
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


class AlignmentFailed(InputError):
    """Raised by a fit that could not align the collection without losing its images (every
    fallback collapsed too): the job fails with this reason rather than return empty images."""


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
    timings: dict = field(default_factory=dict)  # seconds by stage of the fit (written in metrics.json)
    warnings: list[str] = field(default_factory=list)  # said first among metrics.json's warnings
    # (N,) bool, or None: the images whose learned warp strayed and was replaced by the method's
    # initial warp (DPRC's per-image fallback); metrics.json counts them and per_image flags them
    fallback: torch.Tensor | None = None


class AlignmentMethod(Protocol):
    name: ClassVar[str]

    def fit(self, images: torch.Tensor, ctx: FitContext) -> FitResult:
        """``images``: ``(N, C, H, W)`` float in [0, 1] on the target device."""


_METHODS: dict[str, Callable[..., AlignmentMethod]] = {}
# Other kinds of task (kind -> name -> factory): "pair" methods align two images (models.pairwise).
_KINDS: dict[str, dict[str, Callable]] = {"collection": _METHODS}
_ALIGNER_LOADERS: dict[str, Callable[[Path, torch.device], Aligner]] = {}


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _register(table: dict, kind: str, name: str, obj):
    # The same definition again (a module imported twice) is harmless; two families claiming one
    # name is not: the second would silently replace the first.
    old = table.get(name)
    if old is not None and _where(old) != _where(obj):
        raise ValueError(f"{kind} {name!r} is registered already (by {_where(old)}); {_where(obj)} cannot take it")
    table[name] = obj
    return obj


def register_method(name: str, kind: str = "collection"):
    """Decorator: register ``factory(**options)`` under ``name`` for tasks of ``kind``:
    ``"collection"`` (an :class:`AlignmentMethod`, congealing), or ``"pair"`` (two images,
    :mod:`models.pairwise`)."""

    def deco(factory):
        return _register(_KINDS.setdefault(kind, {}), f"{kind} method", name, factory)

    return deco


def register_aligner(method: str):
    """Decorator: register ``loader(model_dir, device) -> Aligner`` for a method's saved models."""

    def deco(loader):
        return _register(_ALIGNER_LOADERS, "aligner loader", method, loader)

    return deco


def registered_methods(kind: str = "collection") -> dict[str, Callable]:
    """The methods of ``kind`` registered so far, by name (a copy). :func:`models.catalog.list_methods`
    is the product's list: it imports every family first."""
    return dict(_KINDS.get(kind, {}))


def registered_aligners() -> dict[str, Callable[[Path, torch.device], Aligner]]:
    """The saved-model loaders registered so far, by method name (a copy)."""
    return dict(_ALIGNER_LOADERS)


_MOVED = ("create_method", "list_methods", "load_aligner")


def __getattr__(name: str):
    # Where the look-ups went when the registry stopped importing the methods: said, not guessed.
    if name in _MOVED:
        raise ImportError(f"models.methods.{name} is now models.catalog.{name} (the registry imports no method)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
