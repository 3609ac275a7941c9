"""RMS norm as a Triton kernel, with the semantics of transformers' `LlamaRMSNorm.forward`:

    rstd = 1 / sqrt(mean(x^2) + eps)       per row, in fp32           x: (..., d)  rstd: (rows,)
    y    = (x * rstd).to(x.dtype)                                      y: (..., d)
    out  = weight * y                      dtype promote(weight, x)    weight: (d,)

The rounding of y to x's dtype before the weight multiply is reproduced (y is computed in fp32,
rounded to x's dtype and widened again, then multiplied by the weight in fp32 and rounded once to
the output dtype, which is what PyTorch's elementwise multiply does), so in bf16 the output
matches the module's bit for bit up to the rounding of rstd.

Why a kernel: the PyTorch composition launches several elementwise ops, and autograd keeps their
intermediates for backward (the fp32 copy of x, x * rstd in fp32, y). Here backward keeps x and
one fp32 number per row (rstd), never the output, and recomputes y from them:

    gy     = g * weight                    (rounded as autograd rounds it: out dtype, then x's)
    grad_x = rstd * (gy - x_hat * mean(gy * x_hat))        x_hat = x * rstd, fp32
    grad_w = sum over rows of g * y                         fp32, cast to weight's dtype

The rounding of y is the identity for the gradient, as `.to`'s backward is for autograd. grad_w
is computed only when the weight requires grad (LoRA freezes the norms): the backward kernel runs
over blocks of rows, each program accumulating its rows' g * y in fp32 registers and writing one
(d,) partial sum; the few partials are summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import check_tensor, on_device_of

MAX_WIDTH = 65536  # one row is one block of registers; wider rows need a split-row kernel


@triton.jit
def _rms_norm_fwd(
    x_ptr, w_ptr, out_ptr, rstd_ptr,
    x_row_stride, d, eps,
    BLOCK: tl.constexpr,
):
    """One program per row: out[row] = w * round_x(x[row] * rstd[row]); rstd[row] stored."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)  # (BLOCK,)
    mask = cols < d
    x_raw = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / d + eps)
    y = (x * rstd).to(x_raw.dtype).to(tl.float32)  # the module's `.to(input_dtype)`
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(
    x_ptr, w_ptr, rstd_ptr, g_ptr, dx_ptr, dw_partial_ptr,
    x_row_stride, g_row_stride, n_rows, rows_per_program, d,
    BLOCK: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """Program p handles rows [p * rows_per_program, ...): their grad_x, and the sum of their
    g * y into dw_partial[p] (when COMPUTE_DW)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)  # (BLOCK,)
    mask = cols < d
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds: int64 row offsets
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x_raw = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x_raw.to(tl.float32) * rstd
        g_raw = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)
        if COMPUTE_DX:
            # autograd forms weight * g in the output's dtype and casts it to y's (x's) dtype
            gy = (g * w).to(g_raw.dtype).to(x_raw.dtype).to(tl.float32)
            dot = tl.sum(gy * x_hat, axis=0) / d
            dx = rstd * (gy - x_hat * dot)
            tl.store(dx_ptr + row * d + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += g * x_hat.to(x_raw.dtype).to(tl.float32)  # g * y, y as the forward rounded it
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * d + cols, dw, mask=mask)


# Interpreted kernels (TRITON_INTERPRET=1 when triton was imported) run on CPU tensors; compiled
# ones need CUDA tensors.
_INTERPRETED = not isinstance(_rms_norm_fwd, triton.runtime.JITFunction)


def _num_warps(block: int) -> int:
    """More warps for wider rows, so that each thread holds a handful of elements."""
    return max(1, min(16, block // 256))


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward kernel: a couple per SM on CUDA, so the grad_w partials are few;
    a handful in the interpreter (which runs programs one after the other)."""
    if device.type == "cuda":
        return min(n_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


def _rows(t: Tensor) -> Tensor:
    """(..., d) -> (rows, d) with a unit stride along d (a view when the layout allows one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        d = x.shape[-1]
        x2 = _rows(x)  # (N, d)
        n_rows = x2.shape[0]
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)  # (N,)
        block = triton.next_power_of_2(d)
        if n_rows:
            with on_device_of(x2):
                _rms_norm_fwd[(n_rows,)](
                    x2, weight, out, rstd, x2.stride(0), d, eps, BLOCK=block, num_warps=_num_warps(block)
                )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, d = x2.shape
        g2 = _rows(grad_out)  # (N, d)
        programs = _backward_programs(n_rows, x2.device)
        rows_per_program = triton.cdiv(n_rows, programs) if programs else 0
        dx = torch.empty((n_rows, d) if need_dx else (0,), dtype=x2.dtype, device=x2.device)
        dw_partial = torch.empty((programs, d) if need_dw else (0,), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(d)
        if programs:
            with on_device_of(x2):
                _rms_norm_bwd[(programs,)](
                    x2, weight, rstd, g2, dx, dw_partial,
                    x2.stride(0), g2.stride(0), n_rows, rows_per_program, d,
                    BLOCK=block, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, num_warps=_num_warps(block),
                )
        grad_x = dx.view(ctx.x_shape) if need_dx else None
        grad_w = dw_partial.sum(0).to(weight.dtype) if need_dw else None
        return grad_x, grad_w, None


def _check(name: str, t: Tensor) -> None:
    check_tensor("rms_norm", name, t, "LlamaRMSNorm", _INTERPRETED)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`LlamaRMSNorm(d, eps)` with this `weight` applied to x (..., d): out (..., d), of dtype
    promote(weight, x). Backward keeps x and one fp32 rstd per row; grad_w only if weight
    requires grad. See the module docstring for the math and the rounding."""
    _check("x", x)
    _check("weight", weight)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm kernel: weight of shape {tuple(weight.shape)} does not match x of shape "
            f"{tuple(x.shape)}: weight must be 1-D with the size of x's last dim"
        )
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(
            f"rms_norm kernel: rows of width {x.shape[-1]} exceed the kernel's {MAX_WIDTH}; use the "
            "PyTorch path (LlamaRMSNorm)"
        )
    if weight.device != x.device:
        raise ValueError(f"rms_norm kernel: weight is on {weight.device} but x is on {x.device}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))
