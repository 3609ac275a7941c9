"""The LoRA term of a linear layer, added in place into the base output.

    out += scaling * (dropout(x) @ A^T @ B^T + b)        x: (..., d_in)  A: (r, d_in)  B: (d_out, r)

Why a custom autograd function: the plain composition (`lora_B(lora_A(dropout(x)))`) keeps a
dropout copy of every adapted layer's input for backward, and allocates a fresh output to add.
Here backward keeps only what it needs:
  - x itself, for the gradient of A (a frozen base linear does not keep its input, so this is
    the one activation the adapter costs; PEFT keeps the same tensor), or, where x is one cheap
    op away from tensors other backward nodes keep anyway (a norm's output, the MLP product), a
    `recompute.Recipe` that rebuilds it from those: then the adapter costs no activation of its
    own but h (see ops/recompute.py);
  - h = dropout(x) @ A^T, shape (N, r): tiny;
  - the dropout mask packed into bits (N x d_in / 8 bytes, 1/32 of an fp32 x), instead of a
    dropout copy of x (PEFT) or a seed to draw it again from (drawing costs more time than
    unpacking: on a 2-core CPU a Llama step with dropout 0.05 was 10% slower regenerating).
The mask is drawn from a seed taken from torch's global CPU generator, so a seeded run is
reproducible and activation checkpointing (which restores the RNG state on recompute) draws the
same mask again. With `kernel` (set by `lorakit.train.kernels.use_kernels`, on CUDA) the Triton
kernels of `lorakit.kernels.dropout` draw the mask from that seed, apply it and pack its bits in
one pass, and apply the bits in backward; the bits have the same layout either way
(`lorakit.ops.dropout_bits`).

Under `torch.compile` neither a Python int seed (`.item()` breaks the graph) nor a seeded
`torch.Generator` (an object dynamo cannot create in a graph) is available, so there the mask is
drawn in the graph from torch's random stream and kept for backward as a bool tensor: N x d_in
bytes per adapted layer with dropout, 8x the eager path's bits (packing them is not worth a
graph's ops there). Without dropout both paths store the same tensors.

Computation runs in the dtype of the base output (e.g. bf16 under autocast); the small adapter
weights are cast to it, never the large input to theirs. Gradients come back in each
parameter's own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dropout_bits import pack_bits, unpack_bits
from .recompute import Recipe


def _keep(shape: torch.Size, device: torch.device, p: float, seed: int) -> Tensor:
    """Which entries dropout keeps, as fp32 0/1, drawn from `seed`: same seed, same mask.

    `rand >= p` in place in a fresh contiguous buffer: the 0/1 floats are what the forward multiplies
    x by and packs into bits, with no bool or scaled copy between (`rand` is about twice as fast as
    `bernoulli_` on CPU). The 1/(1-p) of inverted dropout is applied to the (N, r) products instead
    (see `_add_term`), so no pass over the (N, d_in) mask is spent on it.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device).ge_(p)


def _add_term(out: Tensor, xd: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scaling: float,
              p: float) -> Tensor:
    """The forward: add the LoRA term into `out`; returns h = dropout(x) @ A^T for backward.
    xd: x (N, d_in) in the compute dtype, times the 0/1 dropout mask when p > 0.

    dropout(x) = (x * keep) / (1 - p); the division is applied to h (N, r), not to the (N, d_in)
    input: the same product up to float rounding, with one pass over the input fewer."""
    dtype = out.dtype
    h = xd @ A.to(dtype).t()                                      # (N, r)
    if p > 0:
        h.mul_(1.0 / (1.0 - p))
    out2 = out.view(-1, out.shape[-1])                            # (N, d_out)
    out2.addmm_(h, B.to(dtype).t(), alpha=scaling)
    if bias is not None:
        out2.add_(bias.to(dtype), alpha=scaling)
    return h


def _dropped(t: Tensor, keep: Tensor, kernel: bool, inplace: bool = False) -> Tensor:
    """t (N, d) * the 0/1 mask: `keep` as a tensor of t's shape (any dtype), or with `kernel` as
    bits read by `lorakit.kernels.dropout`."""
    if kernel:
        from ..kernels.dropout import dropout_apply
        return dropout_apply(t, keep, inplace=inplace)
    mask = keep.reshape(t.shape).to(t.dtype)
    return t.mul_(mask) if inplace else t * mask


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None,
                scaling: float, p: float, seed: int, keep: Tensor | None = None,
                recipe: Recipe | None = None, kernel: bool = False) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(out.dtype)            # (N, d_in) in the compute dtype
        packed = p > 0 and keep is None          # eager: the mask from the seed, kept as bits
        if packed and kernel:                    # drawn, applied and packed in one pass
            from ..kernels.dropout import dropout_pack
            xd, keep = dropout_pack(x2.contiguous(), p, seed)
        elif packed:
            mask = _keep(x2.shape, x.device, p, seed)            # (N, d_in) 0/1 fp32
            keep = pack_bits(mask)
            xd = x2 * mask.to(x2.dtype)
        else:
            xd = _dropped(x2, keep, False) if p > 0 else x2
        h = _add_term(out, xd, A, B, bias, scaling, p)
        del xd
        ctx.mark_dirty(out)
        # x itself, or the tensors its recipe rebuilds it from (kept by other nodes anyway)
        xs = recipe.inputs if recipe is not None else (x,)
        ctx.save_for_backward(A, B, h, keep, *xs)
        ctx.packed, ctx.kernel = packed, packed and kernel
        # x is needed only for A's gradient: only then does backward ask the recipe for it
        ctx.rebuild = recipe.rebuild() if recipe is not None and ctx.needs_input_grad[2] else None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.scaling, ctx.p, ctx.has_bias = scaling, p, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        A, B, h, keep, *xs = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        if ctx.packed and not ctx.kernel:
            keep = unpack_bits(keep, torch.Size((h.shape[0], A.shape[1])))      # (N, d_in) 0/1
        dtype = grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])              # (N, d_out)
        grad_x = grad_A = grad_B = grad_bias = None
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[1:5]
        if need_B:
            grad_B = (g.t() @ h.to(dtype)).mul_(s).to(B.dtype)     # (d_out, r)
        if need_bias and ctx.has_bias:
            grad_bias = (g.sum(0) * s).to(B.dtype)                 # (d_out,)
        if need_x or need_A:
            # the 1/(1-p) of dropout(x) = x * keep / (1-p), folded into the (N, r) factor
            gh = (g @ B.to(dtype)).mul_(s / (1.0 - p))             # (N, r)
            if need_A:
                x = ctx.rebuild(*xs) if ctx.rebuild is not None else xs[0]
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                xd = _dropped(x2.contiguous(), keep, ctx.kernel) if p > 0 else x2   # (N, d_in)
                grad_A = (gh.t() @ xd).to(A.dtype)                 # (r, d_in)
            if need_x:
                gx = gh @ A.to(dtype)                              # (N, d_in)
                if p > 0:
                    _dropped(gx, keep, ctx.kernel, inplace=True)   # d dropout(x)/dx = mask
                grad_x = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_out, grad_x, grad_A, grad_B, grad_bias, None, None, None, None, None, None


def lora_linear_(out: Tensor, x: Tensor, *, A: Tensor, B: Tensor, bias: Tensor | None, scaling: float,
                 dropout: float, recipe: Recipe | None = None, kernel: bool = False) -> Tensor:
    """Add the LoRA term into `out` in place and return it (see the module docstring).

    `out` must be the contiguous, freshly computed base output (the base layer's backward must
    not need it, true of linear layers). `dropout` is the probability in effect now (0 in eval).
    `recipe`: how backward can rebuild x instead of keeping it (`recompute.find_recipe(x)`);
    the compiled path keeps x. `kernel`: the dropout mask drawn, applied and packed by the Triton
    kernels of `lorakit.kernels.dropout` (the caller checks that Triton runs on x's device).
    """
    if torch.compiler.is_compiling():   # see the module docstring
        # a fresh tensor, not a view (F.linear with a bias returns a view of its 2-D result): AOTAutograd
        # mis-derives the backward of an in-place autograd.Function on a view. The graph is made
        # functional anyway, so the in-place add saved no memory there.
        out = out.clone(memory_format=torch.contiguous_format)
        keep = torch.rand(x.shape, device=x.device) >= dropout if dropout > 0 else None   # (..., d_in)
        if not torch.is_grad_enabled():   # dynamo inlines a Function's forward then, and mark_dirty breaks the graph
            x2 = x.reshape(-1, x.shape[-1]).to(out.dtype)          # (N, d_in)
            _add_term(out, _dropped(x2, keep, False) if dropout > 0 else x2, A, B, bias, scaling, dropout)
            return out
        return _LoraLinear.apply(out, x, A, B, bias, scaling, dropout, 0, keep)
    elif not out.is_contiguous():
        out = out.contiguous()
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    if kernel and dropout > 0:
        from ..kernels.dropout import fits
        kernel = fits(x) and fits(out)
    return _LoraLinear.apply(out, x, A, B, bias, scaling, dropout, seed, None, recipe, kernel)
