"""DoRA (weight-decomposed LoRA, Liu et al., 2024) on a linear layer: the math `LoraLinear` calls.

For a base weight W (d_out x d_in) and a LoRA update s B A, DoRA trains a magnitude m (d_out,) per
output row and keeps the direction of W + s B A:

    W' = m * (W + s B A) / n        n = ||W + s B A||_row  (d_out,)

m starts at n (`row_norm` of the initial factors), so DoRA starts at the LoRA model's output. In the
forward n is detached from the graph (DoRA paper, section 4.3: the gradient through the norm costs
memory and barely changes training). The forward adds, to the base output `bias + W x`,

    term = (m/n - 1) * W dropout(x) + (m/n) * s * B A dropout(x)

so that with dropout 0 the layer computes exactly `bias + W' x`, reusing the base's W x (with
dropout, W dropout(x) is one more matmul with the base weight). Dropout here is `F.dropout`, whose
mask autograd keeps: the fused op of `lorakit.ops.lora_linear` applies one masked input to the
LoRA factors only, and DoRA needs it twice.

Merging writes W' = (W + s B A) * (m / n) row by row, with n taken from the merged weight; that row
factor is what unmerging divides by before it subtracts s B A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def row_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """n = ||W + s B A||_row, (d_out,), in the dtype of `weight` (W (d_out, d_in); the caller
    chooses it: the base's for the forward, float32 at least for the initial magnitude)."""
    return torch.linalg.norm(weight + scaling * (B @ A).to(weight.dtype), dim=1)


def term(x: Tensor, base_out: Tensor, *, weight: Tensor, A: Tensor, B: Tensor, magnitude: Tensor,
         scaling: float, dropout: float) -> Tensor:
    """(m/n - 1) W dropout(x) + (m/n) s B A dropout(x), (..., d_out), in the dtype of `base_out`.

    x (..., d_in); base_out = W x (..., d_out), the base output without its bias; weight W
    (d_out, d_in); A (r, d_in), B (d_out, r); magnitude m (d_out,); `dropout` the probability in
    effect now (0 in eval)."""
    dtype = base_out.dtype
    with torch.no_grad():
        norm = row_norm(weight, A, B, scaling).to(dtype)                          # (d_out,)
    factor = magnitude.to(dtype) / norm                                           # (d_out,)
    xd = F.dropout(x, dropout, training=True) if dropout > 0 else x
    xd = xd.to(dtype)                                                             # (..., d_in)
    lora_out = (xd @ A.to(dtype).t()) @ B.to(dtype).t()                           # (..., d_out)
    base_part = base_out if dropout == 0 else F.linear(xd, weight.to(dtype))     # (..., d_out)
    return (factor - 1) * base_part + factor * lora_out * scaling


def merge_factor(magnitude: Tensor, merged: Tensor) -> Tensor:
    """m / ||W + s B A||_row, (d_out,), for the merged weight W + s B A (d_out, d_in): what
    merging multiplies each row by, and unmerging divides it by."""
    return magnitude.detach().to(merged.dtype) / torch.linalg.norm(merged, dim=1)
