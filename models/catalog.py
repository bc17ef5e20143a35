"""The alignment methods the product ships, by name: what ``--method`` and the API's ``method`` accept.

Importing this module imports every family; each registers its methods (and their saved-model
loaders) in :mod:`models.methods` as it is imported. The registry never imports a family, and no
family imports this module, so the arrows point one way: ``catalog -> families -> methods``.
A new family adds one import line below (how it registers: :mod:`models.methods`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import baselines, dprc  # noqa: F401  (imported for their registrations)
from .pairwise import classic, learned, searched  # noqa: F401  (kind "pair")
from .semantic import method as _semantic  # noqa: F401  (kind "pair", dense)
from .dense import asic  # noqa: F401  (method "dense")
from .methods import Aligner, AlignmentMethod, registered_aligners, registered_methods

__all__ = ["create_method", "list_methods", "list_aligners", "load_aligner", "create_pair_method", "list_pair_methods"]


def list_methods(kind: str = "collection") -> list[str]:
    """Every method name of ``kind`` (``"collection"``: congealing; ``"pair"``: two images), sorted."""
    return sorted(registered_methods(kind))


def list_aligners() -> list[str]:
    """The methods whose saved models :func:`load_aligner` reads, sorted."""
    return sorted(registered_aligners())


def create_method(name: str, kind: str = "collection", **kwargs) -> AlignmentMethod:
    """The method ``name`` of ``kind`` with its options (``kwargs``) applied; ``ValueError`` for an
    unknown name."""
    methods = registered_methods(kind)
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(methods))}")
    return methods[name](**kwargs)


def load_aligner(model_dir: str | Path, device: torch.device | str = "cpu") -> Aligner:
    """Load a saved aligner; reads JSON and safetensors only, never pickles."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    try:
        method = json.loads(cfg_path.read_text())["method"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg_path}: unreadable model config ({e})") from None
    loaders = registered_aligners()
    if method not in loaders:
        raise ValueError(f"{model_dir}: method {method!r} has no saved-model support")
    return loaders[method](model_dir, torch.device(device))


def list_pair_methods() -> list[str]:
    """The pair methods (:mod:`models.pairwise`), sorted."""
    return list_methods(kind="pair")


def create_pair_method(name: str, **options):
    """The pair method ``name`` with its options applied."""
    return create_method(name, kind="pair", **options)
