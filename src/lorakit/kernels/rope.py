"""Rotary position embedding of queries and keys as a Triton kernel, with the semantics of
transformers' `apply_rotary_pos_emb` (modeling_llama):

    x_embed = x * cos + rotate_half(x) * sin          rotate_half(x) = cat(-x2, x1)
    x = cat(x1, x2) along the head dim D (halves of D/2); per half, with cos = cat(c1, c2) and
    sin = cat(s1, s2) (Llama's tables repeat their halves, but nothing here assumes it):
        out1 = x1 c1 - x2 s1
        out2 = x2 c2 + x1 s2

    x: q (B, Hq, S, D) and k (B, Hk, S, D) with unsqueeze_dim=1, or (B, S, H, D) with
    unsqueeze_dim=2 (Hq != Hk for grouped-query attention); cos, sin: (B or 1, S, D).

The map is linear in x; its transpose gives the backward (derived from the two lines above):
        grad_x1 = g1 c1 + g2 s2
        grad_x2 = g2 c2 - g1 s1
which is the forward with sin's halves swapped and negated (with Llama's tables, "rope with -sin").

Each product is rounded to the output dtype before the sum, as PyTorch's separate elementwise ops
round them, so fp16/bf16 results match the PyTorch function up to one rounding. The output dtype
is promote(q, cos), as in PyTorch; gradients come back in q's and k's dtype.

Why a kernel: the composition materialises rotate_half(x), both products and their sum for q and
for k, and autograd keeps cos and sin plus the broadcast products' inputs. Here backward keeps only
cos and sin (small: B x S x D), and q, k, and their gradients are read and written once each.
Strided q and k (the usual transposed views of the projections' (B, S, H, D) output) are read in
place, and the outputs take q's and k's layout.

cos and sin get no gradient (Llama computes them without grad): `rope` raises a ValueError when
one requires grad while grad is enabled, rather than returning a silent None.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import check_tensor, on_device_of

MAX_TILE = 65536  # heads x D/2 elements held in registers by one program


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr,
    S, H, HALF,
    x_sb, x_sh, x_ss, o_sb, o_sh, o_ss, c_sb, c_ss,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    """One program per (batch, position): rotates all H heads of x there. TRANSPOSE applies the
    transposed rotation (the backward, x being the gradient of the output)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    cols = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    col_mask = cols < HALF
    cs = b * c_sb + s * c_ss
    c1 = tl.load(cos_ptr + cs + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]  # (BLOCK_H, 1); x heads x stride can pass 2^31
    mask = (heads < H) & col_mask[None, :]  # (BLOCK_H, BLOCK_HALF)
    x_row = x_ptr + b * x_sb + s * x_ss + heads * x_sh + cols[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)

    dt = out_ptr.dtype.element_ty  # each product rounded to it, as PyTorch's ops round them
    if TRANSPOSE:
        out1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * s2).to(dt).to(tl.float32)
        out2 = (x2 * c2).to(dt).to(tl.float32) - (x1 * s1).to(dt).to(tl.float32)
    else:
        out1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
        out2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    o_row = out_ptr + b * o_sb + s * o_ss + heads * o_sh + cols[None, :]
    tl.store(o_row, out1.to(dt), mask=mask)
    tl.store(o_row + HALF, out2.to(dt), mask=mask)


# Interpreted kernels (TRITON_INTERPRET=1 when triton was imported) run on CPU tensors; compiled
# ones need CUDA tensors.
_INTERPRETED = not isinstance(_rope_kernel, triton.runtime.JITFunction)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, transpose: bool) -> None:
    """out = rope(x) (or its transpose), x and out both viewed as (B, H, S, D) with any strides
    but a unit one along D; cos, sin (B, S, D), expanded, unit stride along D."""
    B, H, S, D = x.shape
    half = D // 2
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(half)
    if B * S == 0 or H == 0:
        return
    with on_device_of(x):
        _rope_kernel[(B * S,)](
            x, out, cos, sin,
            S, H, half,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0), cos.stride(1),
            BLOCK_H=block_h, BLOCK_HALF=block_half, TRANSPOSE=transpose,
            num_warps=max(1, min(8, block_h * block_half // 256)),
        )


def _heads_at_1(t: Tensor, unsqueeze_dim: int) -> Tensor:
    """A (B, H, S, D) view of t, which is (B, H, S, D) for unsqueeze_dim 1, (B, S, H, D) for 2."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int):
        B = q.shape[0]
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        # (B, S, D), stride 0 along B when the tables are shared by the batch
        cos = _unit_last_stride(cos).expand(B, -1, -1)
        sin = _unit_last_stride(sin).expand(B, -1, -1)
        outs = []
        for x, needs_grad in zip((q, k), ctx.needs_input_grad[:2], strict=True):
            x = _unit_last_stride(x)
            out = torch.empty_like(x, dtype=out_dtype)  # x's layout when x is dense
            _rotate(_heads_at_1(x, unsqueeze_dim), cos, sin, _heads_at_1(out, unsqueeze_dim), False)
            if not needs_grad:  # as in PyTorch: no grad for k's embedding when k needs none
                ctx.mark_non_differentiable(out)
            outs.append(out)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        return outs[0], outs[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q_embed: Tensor, grad_k_embed: Tensor):
        cos, sin = ctx.saved_tensors
        grads = []
        wanted = zip((grad_q_embed, grad_k_embed), ctx.dtypes, ctx.needs_input_grad[:2], strict=True)
        for g, dtype, needed in wanted:
            if not needed:
                grads.append(None)
                continue
            g = _unit_last_stride(g)
            grad = torch.empty_like(g, dtype=dtype)
            _rotate(
                _heads_at_1(g, ctx.unsqueeze_dim), cos, sin, _heads_at_1(grad, ctx.unsqueeze_dim), True
            )
            grads.append(grad)
        return grads[0], grads[1], None, None, None


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> int:
    """Validates the arguments of `rope`; returns unsqueeze_dim as 1 or 2."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor("rope", name, t, "apply_rotary_pos_emb", _INTERPRETED)
        if t.device != q.device:
            raise ValueError(f"rope kernel: {name} is on {t.device} but q is on {q.device}")
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        raise ValueError(
            f"rope kernel: q and k must share a dtype, and cos and sin one (got q {q.dtype}, k {k.dtype}, "
            f"cos {cos.dtype}, sin {sin.dtype})"
        )
    dim = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim
    if dim not in (1, 2):
        raise ValueError(
            f"rope kernel: unsqueeze_dim={unsqueeze_dim} is not supported: use 1 for q, k of shape "
            "(B, H, S, D) or 2 for (B, S, H, D)"
        )
    shapes = (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} "
        f"with unsqueeze_dim={unsqueeze_dim}"
    )
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(
            f"rope kernel: expected 4-D q and k and 3-D cos and sin of one shape (B or 1, S, D), got {shapes}"
        )
    seq = 3 - dim  # the sequence dim of q and k
    B, S, D = q.shape[0], q.shape[seq], q.shape[-1]
    k_fits = k.shape[0] == B and k.shape[seq] == S and k.shape[-1] == D
    if not k_fits or cos.shape[0] not in (1, B) or cos.shape[1:] != (S, D):
        raise ValueError(f"rope kernel: shapes do not match (B, S, D) = ({B}, {S}, {D}): {shapes}")
    if D % 2:
        raise ValueError(
            f"rope kernel: the head dim D={D} must be even (rotate_half splits it in halves): {shapes}"
        )
    if triton.next_power_of_2(max(q.shape[dim], k.shape[dim])) * triton.next_power_of_2(D // 2) > MAX_TILE:
        raise ValueError(
            f"rope kernel: heads x D/2 exceeds the kernel's tile of {MAX_TILE} elements: {shapes}; use the "
            "PyTorch path (apply_rotary_pos_emb)"
        )
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "rope kernel: cos or sin requires grad, but the kernel gives them no gradient (Llama's "
            "rotary tables are computed without one); detach them, or use apply_rotary_pos_emb"
        )
    return dim


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`: (q_embed, k_embed), shaped and laid
    out like q and k. Backward keeps cos and sin only. See the module docstring for the math."""
    dim = _check(q, k, cos, sin, unsqueeze_dim)
    return _Rope.apply(q, k, cos, sin, dim)
