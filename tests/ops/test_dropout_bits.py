"""`lorakit.ops.dropout_bits`: the layout of a dropout mask kept as bits (the kernels' tests check
the Triton side against these functions)."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(3, 8), (5, 7), (1, 1)])
def test_mask_bits_round_trip(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    bits = pack_bits(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_bits(bits, torch.Size(shape)).bool(), keep)


def test_bit_j_of_byte_i_is_entry_8i_plus_j_row_major():
    # entries 0, 3 and 9 kept of a (2, 5) mask: byte 0 = 2^0 + 2^3, byte 1 = 2^(9-8); padding bits 0
    keep = torch.zeros(2, 5)
    keep.view(-1)[[0, 3, 9]] = 1.0
    assert pack_bits(keep).tolist() == [0b1001, 0b10]
