"""The adapter's dropout as Triton kernels: draw, apply and pack the mask in one pass.

The adapter path (`lorakit.ops.lora_linear`) applies dropout to its input x (N, d_in) and keeps the
mask for backward as bits. In PyTorch that is a uniform draw, a compare, a multiply and a packing
matrix-vector product in forward (four passes over N x d_in, three temporaries), and an unpack, a
cast and two multiplies in backward. Here:

  - `dropout_pack(x, p, seed)`: one pass reads x and writes x * keep and the mask's bits, the
    uniform numbers drawn in registers by Triton's Philox generator from (seed, element index);
  - `dropout_apply(t, bits)`: one pass reads t and the bits and writes t * keep (in place if asked):
    backward's x * keep for A's gradient and (dL/dx) * keep for x's.

keep = uniform >= p, so an entry is kept with probability 1 - p; the 1/(1-p) of inverted dropout
is applied by the caller to the (N, r) products. The bits follow the layout that
`lorakit.ops.dropout_bits` defines (bit j of byte i is entry 8 i + j, row-major), so either side
can read the other's. The same seed gives the same mask; it is another stream than torch's
generator gives the PyTorch path, as any two devices' streams differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import SUPPORTED_DTYPES, check_tensor, on_device_of

BYTES = 128          # mask bytes (8 entries each) per program
MAX_ELEMENTS = 2**31 - 2**20   # 32-bit offsets and Philox counters, with room for the last block


@triton.jit
def _pack_kernel(x_ptr, xd_ptr, bits_ptr, n, p, seed, BYTES: tl.constexpr):
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)           # (BYTES,)
    lane = tl.arange(0, 8)                                           # (8,)
    idx = byte[:, None] * 8 + lane[None, :]                          # (BYTES, 8) element indices
    inside = idx < n
    x = tl.load(x_ptr + idx, mask=inside, other=0.0)
    keep = (tl.rand(seed, idx) >= p) & inside                        # (BYTES, 8)
    xd = x.to(tl.float32) * keep.to(tl.float32)
    tl.store(xd_ptr + idx, xd.to(xd_ptr.dtype.element_ty), mask=inside)
    bits = tl.sum(keep.to(tl.int32) << lane[None, :], axis=1)        # (BYTES,)
    tl.store(bits_ptr + byte, bits.to(tl.uint8), mask=byte * 8 < n)


@triton.jit
def _apply_kernel(t_ptr, bits_ptr, out_ptr, n, BYTES: tl.constexpr):
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)           # (BYTES,)
    lane = tl.arange(0, 8)                                           # (8,)
    idx = byte[:, None] * 8 + lane[None, :]                          # (BYTES, 8)
    inside = idx < n
    bits = tl.load(bits_ptr + byte, mask=byte * 8 < n, other=0).to(tl.int32)
    keep = (bits[:, None] >> lane[None, :]) & 1                      # (BYTES, 8) 0/1
    t = tl.load(t_ptr + idx, mask=inside, other=0.0)
    out = t.to(tl.float32) * keep.to(tl.float32)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=inside)


_INTERPRETED = not isinstance(_pack_kernel, triton.runtime.JITFunction)


def fits(x: Tensor) -> bool:
    """Whether the kernels take x: a supported dtype and fewer than 2^31 elements."""
    return x.dtype in SUPPORTED_DTYPES and x.numel() <= MAX_ELEMENTS


def _check(name: str, t: Tensor) -> None:
    check_tensor("dropout", name, t, "lorakit.ops.lora_linear", _INTERPRETED)
    if not t.is_contiguous() or t.numel() > MAX_ELEMENTS:
        raise ValueError(f"dropout kernel: {name} {tuple(t.shape)} must be contiguous with at most "
                         f"{MAX_ELEMENTS} elements")


def dropout_pack(x: Tensor, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """(x * keep, keep's bits): x (N, d) contiguous; keep = uniform(seed) >= p, entry by entry;
    bits uint8 (ceil(N d / 8),)."""
    _check("x", x)
    n = x.numel()
    xd = torch.empty_like(x)                                                       # (N, d)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)          # (ceil(N d / 8),)
    if n:
        with on_device_of(x):
            _pack_kernel[(triton.cdiv(bits.numel(), BYTES),)](x, xd, bits, n, float(p), seed % 2**31, BYTES=BYTES)
    return xd, bits


def dropout_apply(t: Tensor, bits: Tensor, inplace: bool = False) -> Tensor:
    """t * keep with keep read from `bits` (as `dropout_pack` wrote them for t's shape); into t
    itself with `inplace`."""
    _check("t", t)
    n = t.numel()
    if bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"dropout kernel: bits {tuple(bits.shape)} {bits.dtype} are not the mask of "
                         f"{n} entries (uint8, {(n + 7) // 8} bytes)")
    out = t if inplace else torch.empty_like(t)
    if n:
        with on_device_of(t):
            _apply_kernel[(triton.cdiv(bits.numel(), BYTES),)](t, bits, out, n, BYTES=BYTES)
    return out
