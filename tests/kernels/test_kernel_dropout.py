"""The adapter dropout kernels (lorakit.kernels.dropout), run in Triton's interpreter on CPU: the
mask they draw, apply and pack, its bits against the PyTorch path's packing, and the adapter op
with them against the plain composition under that same mask."""

from __future__ import annotations

import re

import pytest
import torch

from lorakit.kernels.dropout import dropout_apply, dropout_pack
from lorakit.ops import pack_bits, unpack_bits
from lorakit.ops.lora_linear import _LoraLinear


@pytest.mark.parametrize("shape", [(37, 29), (8, 16), (1, 3)], ids=["odd", "whole_bytes", "one_byte"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pack_applies_the_mask_its_bits_hold(shape, dtype):
    x = torch.randn(shape).to(dtype)
    xd, bits = dropout_pack(x, 0.3, 12345)
    keep = unpack_bits(bits, torch.Size(shape)).bool()
    assert bits.dtype == torch.uint8 and bits.numel() == -(-x.numel() // 8)
    assert torch.equal(bits, pack_bits(keep))                     # the PyTorch path's layout
    assert xd.dtype == dtype and torch.equal(xd, x * keep)         # exact: a product by 0 or 1
    t = torch.randn(shape).to(dtype)
    assert torch.equal(dropout_apply(t, bits), t * keep)
    inplace = t.clone()
    assert dropout_apply(inplace, bits, inplace=True) is inplace and torch.equal(inplace, t * keep)


def test_padding_bits_of_the_last_byte_are_zero():
    _, bits = dropout_pack(torch.ones(1, 3), 0.0, 7)      # p = 0: every entry kept
    assert bits.tolist() == [0b111]


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_mask_is_a_function_of_the_seed_with_keep_rate_one_minus_p(p):
    x = torch.ones(300, 200)
    _, a = dropout_pack(x, p, 5)
    _, b = dropout_pack(x, p, 5)
    _, c = dropout_pack(x, p, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = unpack_bits(a, x.shape).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p) / x.numel()) ** 0.5)    # within 5 standard errors


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=re.escape("dropout kernel: x (4, 4) must be contiguous with at most "
                                                   "2146435072 elements")):
        dropout_pack(torch.randn(4, 8)[:, ::2], 0.1, 1)
    with pytest.raises(ValueError, match=re.escape("dropout kernel: bits (3,) torch.uint8 are not the mask of "
                                                   "32 entries (uint8, 4 bytes)")):
        dropout_apply(torch.randn(4, 8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape("dropout kernel: x has dtype torch.float64; the kernel "
                                                   "supports float32, bfloat16 and float16")):
        dropout_pack(torch.randn(4, 8, dtype=torch.float64), 0.1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adapter_op_with_the_kernels_equals_the_plain_composition(dtype):
    """out + s * (dropout(x) A^T B^T + b) with the mask the kernel draws for the op's seed."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()   # noqa: E731
    out0, x, A, B, b = mk(6, 5, 11), mk(6, 5, 13), mk(4, 13), mk(11, 4), mk(11)
    p, s, seed = 0.25, 1.5, 99
    y = _LoraLinear.apply(out0 * 1, x, A, B, b, s, p, seed, None, None, True)
    _, bits = dropout_pack(x.detach().reshape(-1, 13), p, seed)
    mask = unpack_bits(bits, torch.Size((30, 13))).view(6, 5, 13).to(dtype) / (1 - p)
    ref = out0 + s * ((x * mask) @ A.t() @ B.t() + b)
    # bf16: the two round the 1/(1-p) in at different places; 2% of each tensor's scale
    def tol(want):
        return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else \
            dict(atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(y, ref, **tol(ref))
    grad = torch.randn(y.shape, generator=g).to(dtype)
    got = torch.autograd.grad((y * grad).sum(), (out0, x, A, B, b))
    want = torch.autograd.grad((ref * grad).sum(), (out0, x, A, B, b))
    for name, a, w in zip(["out", "x", "A", "B", "b"], got, want, strict=True):
        torch.testing.assert_close(a, w, **tol(w), msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.gpu
def test_on_cuda():
    x = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16)
    xd, bits = dropout_pack(x, 0.1, 3)
    keep = unpack_bits(bits, x.shape).bool()
    assert torch.equal(bits, pack_bits(keep)) and torch.equal(xd, x * keep)
    assert abs(keep.float().mean().item() - 0.9) < 0.002
    t = torch.randn_like(x)
    assert torch.equal(dropout_apply(t, bits), t * keep)
