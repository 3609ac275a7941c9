"""The layout of a dropout mask kept as bits, shared by the PyTorch and the Triton paths.

The adapter op (`lorakit.ops.lora_linear`) keeps the 0/1 mask of dropout(x), x (N, d), for its
backward as bits instead of as a copy of x: one byte per 8 entries, 1/32 of an fp32 x.

    byte i, bit j  <->  entry 8 i + j of the mask flattened row-major      bit j has value 2^j

so the bits are uint8 (ceil(N d / 8),), and the bits of the last byte past entry N d - 1 are 0.
`pack_bits` / `unpack_bits` are the PyTorch side; the Triton kernels of `lorakit.kernels.dropout`
write and read the same layout, so either side reads the other's bits (the kernel tests check it
against these functions).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(keep: Tensor) -> Tensor:
    """0/1 (N, d), float or bool -> uint8 (ceil(N d / 8),) in the layout above. One matrix-vector
    product of the (N d / 8, 8) view with the bit values: exact (sums of at most 255 in fp32), and
    one pass where a multiply and a sum over 8 would be two."""
    flat = keep.reshape(-1).to(torch.float32)                       # (N d,)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])               # (8 ceil(N d / 8),)
    values = torch.tensor(_BIT_VALUES, dtype=torch.float32, device=keep.device)
    return torch.mv(flat.view(-1, 8), values).to(torch.uint8)


def unpack_bits(bits: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of `pack_bits`: uint8 0/1 of `shape`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits[:, None] >> shifts).bitwise_and_(1).view(-1)[:shape.numel()].view(shape)   # (*shape,)
