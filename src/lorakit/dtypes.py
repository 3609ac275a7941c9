"""Weight formats by the names configs and flags use: dtypes and quantized bases.

Every verb that takes a dtype (train's `model.dtype`, `merge --dtype`, `generate`, `chat` and
`serve --dtype`, `plan`) names it from here, so a new dtype is added once. Plain names, no torch:
the configs and the CLI parsers that use them are built without it (`lorakit.model_io.TORCH_DTYPES`
maps them to torch dtypes).
"""

from __future__ import annotations

from typing import Literal

DtypeName = Literal["fp32", "bf16", "fp16"]
"""A weight dtype by name."""
DtypeChoice = Literal["auto", DtypeName]
"""A dtype name, or auto: bf16 on a GPU that supports it, else fp32 (`lorakit.model_io.resolve_dtype`)."""

QuantizeBase = Literal["none", "nf4"]
"""How the frozen base is loaded: as it is, or nf4 (QLoRA, `lorakit.quantize`)."""
