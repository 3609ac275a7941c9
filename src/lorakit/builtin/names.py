"""The names that mean the built-in model and dataset, and the cache both are built into: plain
data, so that the train config and its `--help` reference need neither torch nor the builders."""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_MODEL = "lorakit/tiny-llama"
"""`model.name_or_path` of the built-in model (lorakit.builtin.model)."""
BUILTIN_DATA = "lorakit/tiny-tasks"
"""`data.train` of the built-in dataset (lorakit.builtin.tasks)."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
