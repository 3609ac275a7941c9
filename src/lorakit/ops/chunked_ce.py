"""Cross-entropy of a linear output head, summed over labelled rows, without the full logits.

    loss = sum over rows i with t_i != ignore_index of  logsumexp(z_i) - z_i[t_i]
    z = h W^T + b                 h: (N, d)  W: (V, d)  b: (V,)  t: (N,)  z: (N, V)

Why: `F.cross_entropy((h @ W.T).float(), t)` holds the (N, V) logits, their fp32 copy, and in
backward the log-softmax and its gradient: several N x V x 4 bytes, for a large vocabulary the
largest tensors of a LoRA step (V = 128k and 4k tokens is 2 GiB per copy). Here the labelled
rows go through the head `chunk_rows` at a time, and when the loss will be differentiated (grad
mode on and an input requiring grad) their gradients are made in forward, from the chunk of
logits forward makes anyway: softmax - one-hot in place, multiplied into the gradient of h (and
summed into those of W and b when they train). Forward keeps the gradient of h, the size of the
h a backward-time recompute would keep (and, when W trains, W's fp32 gradient, V x d, from
forward until backward); backward only scales the kept gradients by the incoming scalar, so the
loss cannot be differentiated twice (`once_differentiable`). So no matmul is repeated: recomputing the logits in
backward instead would cost one more h W^T (about 8% of a small Llama's step).

At most one chunk's logits (chunk_rows x V, fp32, with the softmax's temporaries of that size)
exist at a time. The price is smaller matmuls (see `default_chunk_rows`). Rows whose target is
`ignore_index` (prompt tokens of supervised data, padding) are dropped before any matmul, so they
cost nothing at all.

Precision follows the plain path `F.linear(h, W, b).float()` + cross-entropy: the logits come out
of the matmul in h's dtype (the caller casts h and W to the autocast dtype, as `F.linear` does
under autocast), are upcast to fp32 for the softmax, and their gradient is cast back to that dtype
before the matmuls, as autograd does. Gradients of W and b are summed over chunks in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels.common import SUPPORTED_DTYPES as KERNEL_DTYPES

IGNORE_INDEX = -100
MIN_CHUNK_ROWS = 256


def default_chunk_rows(n_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so that a chunk's logits take about as many elements as the hidden states
    of all rows (n_rows x hidden): the loss then costs about one more copy of them. At least
    `MIN_CHUNK_ROWS`, because each chunk is a handful of ops and each op has a fixed cost (a
    kernel launch; on CPU a thread synchronisation, slow on a busy machine). Loss head forward +
    backward for 1024 x 512 x 8000 on a 2-core CPU with 256-row chunks: 1.15x the plain path
    (bench/bench_train_memory.py); when backward still recomputed the logits, 2.2-2.5x, and with
    2 threads 64-row chunks were twice as slow as 256-row ones."""
    chunks = max(1, math.ceil(vocab / hidden))
    return max(MIN_CHUNK_ROWS, math.ceil(n_rows / chunks))


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int,
                ignore_index: int, differentiated: bool, kernel: bool) -> Tensor:
        rows = (targets != ignore_index).nonzero().squeeze(1)       # (n,) labelled rows
        h = hidden.index_select(0, rows)                            # (n, d)
        t = targets.index_select(0, rows)                           # (n,)
        n = h.shape[0]
        outside = (t < 0) | (t >= weight.shape[0])                  # (n,)
        if bool(outside.any()):                                     # one sync, as the nonzero above
            bad = int(t[outside][0])
            raise ValueError(f"chunked_cross_entropy: target {bad} is outside the vocabulary of the head "
                             f"({weight.shape[0]} rows) and is not ignore_index ({ignore_index}); resize the "
                             "model's embeddings to the tokenizer (model.resize_token_embeddings)")
        need_h, need_w, need_b = (differentiated and need for need in ctx.needs_input_grad[:3])
        grads = need_h or need_w or need_b
        acc = loss_dtype(h.dtype)                                  # fp32 losses and sums
        grad_h = torch.empty_like(h) if need_h else None                                   # (n, d)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # (V, d)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=h.device) if need_b else None    # (V,)
        total = torch.zeros((), dtype=acc, device=h.device)
        if kernel:
            from ..kernels.cross_entropy import cross_entropy_rows_
        with torch.autocast(h.device.type, enabled=False):   # dtypes are the caller's
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                z = F.linear(h[s:e], weight, bias)                                  # (c, V) in h's dtype
                if kernel:   # the gradient over z, in z's dtype (lorakit.kernels.cross_entropy)
                    total += cross_entropy_rows_(z, t[s:e], write_grad=grads).sum()
                    g = z
                else:
                    g = F.log_softmax(z.to(acc), dim=1)                             # (c, V) fp32
                    rows_c = torch.arange(e - s, device=g.device)
                    total -= g[rows_c, t[s:e]].sum()
                    if grads:
                        g.exp_()                                                    # softmax
                        g[rows_c, t[s:e]] -= 1.0                                    # - one-hot
                del z
                if not grads:
                    continue
                if need_b:
                    grad_b += g.sum(0, dtype=acc)
                g = g.to(h.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[s:e])                            # (c, d)
                if need_w:
                    grad_w += g.t() @ h[s:e]                                        # (V, d)
                del g
        ctx.save_for_backward(grad_h, grad_w, grad_b, rows)
        ctx.n_hidden_rows, ctx.dtypes = hidden.shape[0], (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w, grad_b, rows = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # the incoming gradient scales the small results, not every (c, V) chunk
        grad_hidden = None
        if grad_h is not None:
            grad_hidden = grad_h.new_zeros(ctx.n_hidden_rows, grad_h.shape[1]).index_copy_(
                0, rows, torch.mul(grad_h, grad_total))     # (N, d); the fp32 scalar, not rounded to h's dtype
        grad_weight = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        grad_bias = (grad_b * grad_total).to(b_dtype) if grad_b is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                          chunk_rows: int | None = None, ignore_index: int = IGNORE_INDEX,
                          kernel: bool = False) -> Tensor:
    """Sum of `cross_entropy(hidden @ weight.T + bias, targets)` over rows whose target is not
    `ignore_index`, as an fp32 scalar (fp64 for fp64 inputs), holding at most `chunk_rows` rows of logits at a time
    (default: `default_chunk_rows`). See the module docstring.

    hidden (N, d) and weight (V, d) must share a dtype (the compute dtype); targets (N,) int64.
    `kernel`: each chunk's softmax and gradient by the Triton kernel `lorakit.kernels.cross_entropy`
    (needs triton; runs on CUDA, or in Triton's interpreter); fp32, bf16 and fp16 only.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be (N, d) and (V, d)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: targets {tuple(targets.shape)} must be ({hidden.shape[0]},), "
                         "one per row of hidden")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"chunked_cross_entropy: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
                         f"({None if bias is None else bias.dtype}) must share the compute dtype; cast them to it")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1])
    if chunk_rows < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if kernel and hidden.dtype not in KERNEL_DTYPES:
        raise ValueError(f"chunked_cross_entropy: the Triton kernel takes {', '.join(map(str, KERNEL_DTYPES))}, "
                         f"not {hidden.dtype}; use kernel=False")
    differentiated = torch.is_grad_enabled()    # inside an autograd function's forward it never is
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, ignore_index, differentiated,
                                      kernel)
