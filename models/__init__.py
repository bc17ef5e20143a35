"""The alignment core. Imports nothing from ``service`` or ``worker``.

Submodules are imported lazily so that torch-free parts (``models.imageio``)
can be used by the API process without loading torch.
"""
import importlib

__all__ = ["geometry", "imageio", "metrics", "methods", "catalog", "dprc", "pipeline", "perturb", "data", "report"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
