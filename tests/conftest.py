"""Shared fixtures: tiny models built from configs (no hub), seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The built-in model and tasks are cached under $LORAKIT_CACHE (default ~/.cache/lorakit). The suite
# keeps its own cache, never the user's: one per checkout, git-ignored, kept across runs so the
# built-in model (~20 s to pretrain) is built once. Set here, before any test imports lorakit, and
# in os.environ so the CLI and torchrun subprocesses the tests launch inherit it.
# LORAKIT_TEST_CACHE moves it (e.g. to a CI cache directory).
os.environ["LORAKIT_CACHE"] = os.environ.get(
    "LORAKIT_TEST_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "lorakit-test"))

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
