"""Fixtures for the semantic tests."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    # The tests share a small machine; one intra-op thread each keeps them from oversubscribing it.
    yield
