"""Fixtures for the pairwise tests (helpers in ``pairlib``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for pairlib (importlib import mode)


@pytest.fixture(autouse=True)
def _threads():
    # The tests share a small machine; one intra-op thread each keeps them from oversubscribing it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
