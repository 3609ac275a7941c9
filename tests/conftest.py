"""Shared fixtures: tiny models built from configs (no hub), seeded."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
