"""Lazily loaded package exports: a package names what it exports and the submodule each comes
from, and the submodule is imported on first use (so a torch-free part can be used without
loading torch)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The package's module ``__getattr__``: ``name`` -> ``package.<exports[name]>.name``."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(name)

    return __getattr__
