"""Where the kernels can run and what every kernel checks of its tensors. No triton import at
module level: `lorakit.ops`, `lorakit.layers` and the training loop read this without triton."""

from __future__ import annotations

import contextlib
import functools
import os

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


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly."""
    if not triton_importable():
        return False
    try:
        from triton import knobs  # triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


def on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it t's (a run on cuda:1 without torchrun
    never sets it)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def runs_on(t: Tensor) -> bool:
    """Whether the kernels can take this tensor."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
