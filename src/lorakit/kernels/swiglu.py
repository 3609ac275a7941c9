"""The SwiGLU product of the Llama MLP as a Triton kernel: `F.silu(gate) * up`.

    out = round(silu(gate)) * up           silu(z) = z * s(z),  s = sigmoid      gate, up, out: (...)

round() is the rounding to the inputs' dtype that PyTorch applies to `F.silu`'s output before the
multiply; it is reproduced (silu in fp32, rounded and widened again, the product in fp32 rounded
once), so in fp16/bf16 the output matches the PyTorch composition up to the rounding of s(z).

Why a kernel: the composition writes silu(gate) to memory and reads it back, and autograd keeps
gate, silu(gate) and up for backward. Here backward keeps gate and up only (the inputs, which the
caller's graph usually holds anyway) and recomputes s(gate) in registers:

    grad_up   = g * round(silu(gate))
    grad_gate = round(g * up) * s(gate) * (1 + gate * (1 - s(gate)))      = round(g * up) * silu'(gate)

in fp32, rounding the intermediates where autograd does, cast to the inputs' dtype. The kernels
run over the flat elements, a block per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import check_tensor, on_device_of

BLOCK = 1024  # elements per program


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    gate_raw = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    gate = gate_raw.to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(gate_raw.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(gate_ptr, up_ptr, g_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    gate_raw = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    gate = gate_raw.to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = (gate * sig).to(gate_raw.dtype).to(tl.float32)
    g_silu = (g * up).to(gate_raw.dtype).to(tl.float32)  # autograd's grad of silu(gate), rounded
    dgate = g_silu * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (g * silu).to(dup_ptr.dtype.element_ty), mask=mask)


# Interpreted kernels (TRITON_INTERPRET=1 when triton was imported) run on CPU tensors; compiled
# ones need CUDA tensors.
_INTERPRETED = not isinstance(_swiglu_fwd, triton.runtime.JITFunction)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()  # (...) each; flat indexing below
        out = torch.empty_like(gate)
        n = gate.numel()
        if n:
            with on_device_of(gate):
                _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        g = grad_out.contiguous()  # (...)
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            with on_device_of(gate):
                _swiglu_bwd[(triton.cdiv(n, BLOCK),)](gate, up, g, dgate, dup, n, BLOCK=BLOCK)
        need_gate, need_up = ctx.needs_input_grad
        return (dgate if need_gate else None), (dup if need_up else None)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up` for gate, up of the same shape and dtype (float32, bfloat16, float16).
    Backward keeps gate and up only. See the module docstring for the math and the rounding."""
    for name, t in (("gate", gate), ("up", up)):
        check_tensor("swiglu", name, t, "F.silu(gate) * up", _INTERPRETED)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"swiglu kernel: gate {tuple(gate.shape)} {gate.dtype} on {gate.device} and up "
            f"{tuple(up.shape)} {up.dtype} on {up.device} must have the same shape, dtype and device"
        )
    return _SwiGLU.apply(gate, up)
