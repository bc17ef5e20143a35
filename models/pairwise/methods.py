"""Pair methods: what they take, what they return, and their registry.

A pair method estimates, for a batch of image pairs of one size, the homography that maps
the target onto the source: ``source_from_target`` in normalised coordinates
(:mod:`models.geometry`), so ``target(p) ~ source(M p)``, the product's backward-map
convention with the target as the aligned output. Pair methods live in the registry of
:mod:`models.methods` under the kind ``"pair"``; :func:`models.catalog.create_pair_method` and
:func:`models.catalog.list_pair_methods` look them up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..methods import Cancelled, register_method

__all__ = ["PairContext", "PairEstimate", "PairMethod", "register_pair_method", "ConfigPairMethod", "KIND"]

KIND = "pair"


@dataclass
class PairContext:
    """What a pair method needs besides the images."""

    seed: int = 0
    progress: Callable[[int, int, str], None] | None = None  # (done, total, stage) within this batch
    should_stop: Callable[[], bool] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled")


@dataclass
class PairEstimate:
    """One batch's answer."""

    source_from_target_norm: torch.Tensor  # (B, 3, 3); non-finite where the method found nothing
    confidence: torch.Tensor  # (B,) in [0, 1], in the method's own terms
    notes: list[str] = field(default_factory=list)
    # Dense methods (models.semantic): a thin-plate spline applied to the target's normalised points
    # before the matrix, target(p) ~ source(M tps(p)); tps_grid x tps_grid control points on [-1, 1]^2
    # (x fastest) landing at tps_dst (B, K, 2). None: the matrix alone.
    tps_dst: torch.Tensor | None = None
    tps_grid: int = 0


class PairMethod(Protocol):
    """A method may also offer ``fit_collection(images, device, progress, should_stop)`` (train on the
    job's images before any pair; :func:`models.pairwise.pipeline.run_pairs` calls it) and
    ``save(model_dir)`` (the pair model it trained, written into the output as ``model/``)."""

    name: ClassVar[str]

    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        """``source`` ``(B, Cs, Hs, Ws)``, ``target`` ``(B, Ct, Ht, Wt)``: float in [0, 1] on the target device."""


def register_pair_method(name: str):
    return register_method(name, kind=KIND)



class ConfigPairMethod:
    """A pair method that is a config dataclass (``config_cls``, built from the user's options) and a
    batched fit (:meth:`fit`, returning an object with ``source_from_target_norm`` and
    ``confidence``); the job's seed replaces the config's ``seed``. Unknown option names are a
    ``TypeError`` naming the known ones; JSON lists become the tuples a config holds."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    min_confidence: ClassVar[float]

    def __init__(self, **options):
        fields = self.config_cls.__dataclass_fields__
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        self.config = self.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})

    @staticmethod
    def fit(source: torch.Tensor, target: torch.Tensor, cfg, progress, should_stop):
        raise NotImplementedError

    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        cfg = replace(self.config, seed=ctx.seed)
        stop = ctx.check_stop if ctx.should_stop is not None else None
        fit = self.fit(source, target, cfg, ctx.progress, stop)
        return PairEstimate(fit.source_from_target_norm, fit.confidence)
