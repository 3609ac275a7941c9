"""Log-probabilities of target tokens under a linear output head, without the full logits.

    logp_i = z_i[t_i] - logsumexp(z_i)        z = (h W^T + b) / tau      h: (n, d)  W: (V, d)  t: (n,)

The preference and RL objectives (lorakit.train.preference, lorakit.train.grpo) need a
log-probability per completion token, not one summed cross-entropy: DPO compares sequence sums of
two completions, GRPO weighs every token by its own ratio and advantage. As for the chunked loss
(lorakit.ops.chunked_ce), the (n, V) logits are made `chunk_rows` rows at a time and dropped.

Gradient: d logp_i / d h_i = (onehot(t_i) - softmax(z_i)) W / tau, a (d,) vector per row that the
incoming per-row gradient g_i only scales. So when the head is frozen (LoRA's usual case) forward
keeps that vector for every row, one (n, d) tensor the size of h, from the chunk of logits it
makes anyway, and backward is a multiplication: no logits are recomputed. When the head trains
(`modules_to_save`) its gradient sum_i g_i (onehot - softmax)_i^T h_i needs g, so backward makes
each chunk's logits again instead.

Precision follows the plain path: the logits in h's dtype from the matmul, upcast to fp32 for the
softmax; the log-probabilities are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .chunked_ce import default_chunk_rows, loss_dtype


def _chunk_log_softmax(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """(c, V) fp32 log-softmax of one chunk's logits."""
    z = F.linear(h, weight, bias)                                   # (c, V) in h's dtype
    z = z.to(loss_dtype(h.dtype))
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=1)


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                chunk_rows: int, differentiated: bool) -> Tensor:
        n = hidden.shape[0]
        need_h, need_w, need_b = (differentiated and need for need in ctx.needs_input_grad[:3])
        keep_grad_h = need_h and not (need_w or need_b)            # frozen head: the gradient made here
        out = torch.empty(n, dtype=loss_dtype(hidden.dtype), device=hidden.device)   # (n,)
        grad_h = torch.empty_like(hidden) if keep_grad_h else None                     # (n, d)
        with torch.autocast(hidden.device.type, enabled=False):   # dtypes are the caller's
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                g = _chunk_log_softmax(hidden[s:e], weight, bias, temperature)        # (c, V)
                rows = torch.arange(e - s, device=g.device)
                out[s:e] = g[rows, targets[s:e]]
                if keep_grad_h:
                    g.exp_().neg_()                                                    # - softmax
                    g[rows, targets[s:e]] += 1.0                                       # onehot - softmax
                    g = g.to(hidden.dtype)
                    torch.mm(g, weight, out=grad_h[s:e])                               # (c, d)
                    if temperature != 1.0:
                        grad_h[s:e] /= temperature
                del g
        if keep_grad_h:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.kept, ctx.temperature, ctx.chunk_rows = keep_grad_h, temperature, chunk_rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.kept:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = loss_dtype(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=hidden.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_rows):
                e = min(s + ctx.chunk_rows, hidden.shape[0])
                g = _chunk_log_softmax(hidden[s:e], weight, bias, ctx.temperature).exp_().neg_()   # (c, V)
                g[torch.arange(e - s, device=g.device), targets[s:e]] += 1.0
                g *= (grad_out[s:e] / ctx.temperature)[:, None]                    # d(sum g_i logp_i) / dz
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(hidden.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[s:e])
                if need_w:
                    grad_w += g.t() @ hidden[s:e]
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def chunked_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                     temperature: float = 1.0, chunk_rows: int | None = None) -> Tensor:
    """(n,) fp32 log-probabilities of `targets` under `hidden @ weight.T + bias` divided by
    `temperature`, at most `chunk_rows` rows of logits at a time (module docstring). hidden (n, d)
    and weight (V, d) share the compute dtype; targets (n,) int64, all inside the vocabulary."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be (n, d) and (V, d)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_logprobs: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1])
    return _ChunkedLogProbs.apply(hidden, weight, bias, targets, float(temperature), chunk_rows,
                                  torch.is_grad_enabled())
