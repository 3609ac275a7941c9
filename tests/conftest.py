"""Shared fixtures: tiny models built from configs (no hub), seeded."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (lorakit.kernels) run in Triton's interpreter on CPU tensors. The switch is read
    # when a kernel is defined, triton's own helpers (tl.zeros, ...) included, so it is set before
    # anything imports triton: transformers does, on import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402  (imports transformers, which imports triton)


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
