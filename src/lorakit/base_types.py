"""The base layer types lorakit adapts, named once for the layers, injection and quantization.

transformers' GPT-2 style `Conv1D` is a linear layer whose weight is stored as (d_in, d_out); it
counts as a linear layer everywhere, with the transposed layout (`fan_in_fan_out`).
"""

from __future__ import annotations

from torch import nn

try:  # transformers' GPT-2 style linear with a (d_in, d_out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency; keep the core importable
    Conv1D = None  # type: ignore[assignment, misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (weight (d_in, d_out))."""
    return Conv1D is not None and isinstance(module, Conv1D)
