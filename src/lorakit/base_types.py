"""The base layer types lorakit adapts, named once for the layers, injection and quantization.

transformers' GPT-2 style `Conv1D` is a linear layer whose weight is stored as (d_in, d_out); it
counts as a linear layer everywhere, with the transposed layout (`fan_in_fan_out`). The fused
experts of mixture-of-experts models are not layers but 3-D parameters (`expert_parameters`).
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


def expert_parameters(module: nn.Module) -> list[str]:
    """The names of the fused expert weights `module` holds itself: 3-D floating-point parameters
    (experts x d_out x d_in, as transformers 5 stores the experts of Mixtral, Qwen-MoE, gpt-oss,
    DeepSeek) of a module that is not itself a layer, in registration order. A routing gate is 2-D,
    so it is never among them. Weights stored as 4-bit NF4 (`lorakit.quantize.quantize_experts`)
    are parametrizations of the module, listed in the order they were quantized (the same order)."""
    if isinstance(module, LINEAR_TYPES + CONV_TYPES + (nn.Embedding,)):
        return []
    names = [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
    quantized = module._modules.get("parametrizations") or {}   # its own, not a wrapper's base's
    return names + [name for name in quantized if getattr(quantized[name][0], "shape", None) is not None
                    and len(quantized[name][0].shape) == 3]
