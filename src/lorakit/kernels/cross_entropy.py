"""Cross-entropy of a chunk of logits, with its gradient written over the logits in place.

The chunked loss (`lorakit.ops.chunked_ce`) makes one chunk of logits z (c, V) at a time and needs,
per row, the loss logsumexp(z) - z[t] and, when training, the gradient softmax(z) - one_hot(t).
In PyTorch that is an fp32 copy of z (for bf16 logits), its log-softmax (another fp32 c x V) and a
cast of the gradient back: about 10 bytes per logit over three or four passes. This kernel reads
each row twice (an online max and sum of exponentials, then the gradient) in fp32 registers and
writes the gradient over z in z's own dtype: no fp32 copy, c x V x 2 bytes in all for bf16.

One program per row, `BLOCK` logits at a time, so any vocabulary size fits in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import on_device_of

BLOCK = 4096   # logits per loop step; a power of two


@triton.jit
def _xent_kernel(z_ptr, t_ptr, loss_ptr, stride, vocab, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    # pass 1: running max m and sum of exp(z - m), in fp32
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        z = tl.load(z_row + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(t_ptr + row)
    z_target = tl.load(z_row + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_target)
    if WRITE_GRAD:
        # pass 2: softmax - one_hot, over z
        for start in range(0, vocab, BLOCK):
            idx = start + cols
            valid = idx < vocab
            z = tl.load(z_row + idx, mask=valid, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(idx == target, 1.0, 0.0)
            tl.store(z_row + idx, g.to(z_ptr.dtype.element_ty), mask=valid)


def cross_entropy_rows_(logits: Tensor, targets: Tensor, write_grad: bool) -> Tensor:
    """Per-row cross-entropy (c,) in fp32 of `logits` (c, V) against `targets` (c,) (every target a
    class index: ignored rows are dropped before); with `write_grad`, `logits` is overwritten by
    softmax - one_hot, the gradient of the summed loss, in its own dtype."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows_: logits {tuple(logits.shape)} must be (rows, vocab) with "
                         "contiguous rows")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows_: targets {tuple(targets.shape)} must be ({logits.shape[0]},)")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)   # (c,)
    if rows:
        with on_device_of(logits):
            _xent_kernel[(rows,)](logits, targets, loss, logits.stride(0), vocab, WRITE_GRAD=write_grad,
                                  BLOCK=min(BLOCK, triton.next_power_of_2(vocab)))
    return loss
