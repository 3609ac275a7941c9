"""Weight dtypes by the names configs and flags use, and the torch dtypes they stand for.

Every verb that takes a dtype (train's `model.dtype`, `merge --dtype`, `generate`, `chat` and
`serve --dtype`, `plan`) names it from here, so a new dtype is added once.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["fp32", "bf16", "fp16"]
"""A weight dtype by name."""
DtypeChoice = Literal["auto", DtypeName]
"""A dtype name, or auto: bf16 on a GPU that supports it, else fp32 (`lorakit.model_io.resolve_dtype`)."""

TORCH_DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16),
                                                strict=True))
"""Dtype name -> torch dtype."""
