"""Fixtures for the pairwise tests (helpers in ``pairlib``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for pairlib (importlib import mode)


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    # The tests share a small machine; one intra-op thread each keeps them from oversubscribing it.
    yield
