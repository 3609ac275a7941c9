"""Fixtures of the mixture and fusion tests: the task experts, trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from mixture_support import task_experts, tiny_task_experts


@pytest.fixture(scope="session")
def experts(tmp_path_factory) -> Path:
    """Experts trained on the built-in model (30 steps each, ~10 s): for the tests of learning (slow)."""
    return task_experts(tmp_path_factory.getbasetemp() / "task-experts", steps=30, n_eval=20)


@pytest.fixture(scope="session")
def tiny_experts(tmp_path_factory) -> Path:
    """Random experts on the tiny Llama: for the tests of the mechanics."""
    return tiny_task_experts(tmp_path_factory.getbasetemp() / "tiny-task-experts")
