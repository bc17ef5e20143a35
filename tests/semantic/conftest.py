"""Fixtures for the semantic tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    # The tests share a small machine; one intra-op thread each keeps them from oversubscribing it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
