"""The LoRA term of a linear layer, added in place into the base output.

    out += scaling * (dropout(x) @ A^T @ B^T + b)        x: (..., d_in)  A: (r, d_in)  B: (d_out, r)

Why a custom autograd function: the plain composition (`lora_B(lora_A(dropout(x)))`) keeps a
dropout copy of every adapted layer's input for backward, and allocates a fresh output to add.
Here backward keeps only what it needs:
  - x itself, for the gradient of A (a frozen base linear does not keep its input, so this is
    the one activation the adapter costs; PEFT keeps the same tensor);
  - h = dropout(x) @ A^T, shape (N, r): tiny;
  - the dropout mask as a seed: backward regenerates it once, for both grad_A and grad_x,
    instead of storing a dropout copy of x.
The seed is drawn from torch's global CPU generator, so a seeded run is reproducible and
activation checkpointing (which restores the RNG state on recompute) sees the same mask.

Computation runs in the dtype of the base output (e.g. bf16 under autocast); the small adapter
weights are cast to it, never the large input to theirs. Gradients come back in each
parameter's own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _mask(shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float,
          seed: int) -> Tensor:
    """The inverted-dropout multiplier (0 or 1/(1-p)) drawn from `seed`: same seed, same mask.

    Built from `rand >= p` into a fresh contiguous buffer, so it never depends on the strides of
    the tensor it is applied to; `rand` is about twice as fast as `bernoulli_` on CPU.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=dtype, device=device).ge_(p).div_(1.0 - p)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None,
                scaling: float, p: float, seed: int) -> Tensor:
        dtype = out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)                # (N, d_in)
        xd = x2 * _mask(x2.shape, dtype, x2.device, p, seed) if p > 0 else x2
        h = xd @ A.to(dtype).t()                                  # (N, r)
        out2 = out.view(-1, out.shape[-1])                        # (N, d_out)
        out2.addmm_(h, B.to(dtype).t(), alpha=scaling)
        if bias is not None:
            out2.add_(bias.to(dtype), alpha=scaling)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, h)
        ctx.scaling, ctx.p, ctx.seed, ctx.has_bias = scaling, p, seed, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, A, B, h = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        dtype = grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])              # (N, d_out)
        grad_x = grad_A = grad_B = grad_bias = None
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[1:5]
        if need_B:
            grad_B = (g.t() @ h.to(dtype)).mul_(s).to(B.dtype)     # (d_out, r)
        if need_bias and ctx.has_bias:
            grad_bias = (g.sum(0) * s).to(B.dtype)                 # (d_out,)
        if need_x or need_A:
            gh = (g @ B.to(dtype)).mul_(s)                         # (N, r)
            mask = _mask(gh.shape[:1] + A.shape[1:], dtype, gh.device, p, seed) if p > 0 else None
            if need_A:
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                xd = x2 * mask if mask is not None else x2         # (N, d_in)
                grad_A = (gh.t() @ xd).to(A.dtype)                 # (r, d_in)
            if need_x:
                gx = gh @ A.to(dtype)                              # (N, d_in)
                if mask is not None:
                    gx.mul_(mask)                                  # d dropout(x)/dx = mask
                grad_x = gx.view(x.shape).to(x.dtype)
        return grad_out, grad_x, grad_A, grad_B, grad_bias, None, None, None


def lora_linear_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None,
                 scaling: float, dropout: float) -> Tensor:
    """Add the LoRA term into `out` in place and return it (see the module docstring).

    `out` must be the contiguous, freshly computed base output (the base layer's backward must
    not need it, true of linear layers). `dropout` is the probability in effect now (0 in eval).
    """
    if not out.is_contiguous():
        out = out.contiguous()
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    return _LoraLinear.apply(out, x, A, B, bias, scaling, dropout, seed)
