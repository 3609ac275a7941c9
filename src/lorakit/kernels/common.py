"""What every kernel checks of its tensors (no triton import: `lorakit.ops` reads the dtypes)."""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(kernel: str, name: str, t: Tensor, fallback: str, interpreted: bool) -> None:
    """A float32/bfloat16/float16 tensor on CUDA (or anywhere in Triton's interpreter), else a
    ValueError naming the kernel, the tensor and the PyTorch code `fallback` to use instead."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{kernel} kernel: {name} has dtype {t.dtype}; the kernel supports float32, bfloat16 "
                         f"and float16, use the PyTorch path ({fallback}) for others")
    if t.device.type != "cuda" and not interpreted:
        raise ValueError(f"{kernel} kernel: {name} is on {t.device}, the kernel needs CUDA tensors; use the "
                         f"PyTorch path ({fallback}) on CPU")
