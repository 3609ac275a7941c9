"""The Triton RMS norm (lorakit.kernels.rms_norm), run in Triton's interpreter on CPU
(tests/conftest.py), against transformers' LlamaRMSNorm: output, grad of x, grad of the weight."""

from __future__ import annotations

import re

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.kernels import rms_norm as kernel
from lorakit.kernels.rms_norm import rms_norm

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def assert_matches(actual, expected, rounding=None, mostly_exact=False):
    """Within the rounding of `rounding` (default: expected's dtype), the least precise dtype the
    computation rounds to. fp32: the same math up to the order of fp32 sums. fp16: one unit in the
    last place, 2^-10 relative. bf16: one unit, 2^-7, plus Triton's interpreter, which casts fp32
    to bf16 by truncation (a GPU rounds to nearest): 2^-6 of the tensor's scale. A wrong mask or
    stride is off by O(1) of that scale.

    mostly_exact: the kernel rounds where PyTorch rounds, so all elements but the few where the
    last fp32 bit of rstd tips a rounding are equal up to fp32 noise (a kernel that skipped one of
    PyTorch's roundings differs in about a quarter of them). Checked in fp16, which the interpreter
    rounds to nearest like a GPU."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rounding = rounding or expected.dtype
    if rounding == F32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    rel = 2**-10 if rounding == F16 else 2**-6
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)
    if mostly_exact:
        off = ~torch.isclose(actual.float(), expected.float(), rtol=1e-5, atol=1e-6 * scale)
        assert off.float().mean().item() <= 0.01


def run(fn, x, weight, grad_out):
    """out, grad_x, grad_weight of fn(x) (None for a leaf that needs no grad)."""
    out = fn(x)
    wrt = [t for t in (x, weight) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return out, *(next(grads) if t.requires_grad else None for t in (x, weight))


def compare(shape, x_dtype=F32, w_dtype=None, eps=1e-6, x_scale=1.0, x_grad=True, w_grad=True,
            device="cpu", seed=0):
    w_dtype = w_dtype or x_dtype
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (x_scale * torch.randn(shape, generator=g)).to(device, x_dtype).requires_grad_(x_grad)
    module = LlamaRMSNorm(d, eps=eps).to(device, w_dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(d, generator=g))
    module.weight.requires_grad_(w_grad)
    grad_out = torch.randn(shape, generator=g).to(device, torch.promote_types(x_dtype, w_dtype))

    want = run(module, x, module.weight, grad_out)
    got = run(lambda t: rms_norm(t, module.weight, eps), x, module.weight, grad_out)
    rounding = max(x_dtype, w_dtype, key=lambda t: torch.finfo(t).eps)
    # grad_w: PyTorch rounds each product g * y to the weight's dtype before summing, the kernel
    # sums in fp32; so it is mostly exact only for an fp32 weight
    exact = (True, True, w_dtype == F32)
    for a, e, mostly_exact in zip(got, want, exact, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert_matches(a, e, rounding, mostly_exact=mostly_exact and rounding == F16)
    return got


@pytest.mark.parametrize("shape", [(17, 200), (2, 3, 5, 96), (5, 1376)], ids=["2d", "4d", "wide"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_output_and_gradients_match_llama_rms_norm(shape, dtype):
    # widths 200, 96, 1376 are no power of two: the masked tail of each row's block matters;
    # 17 and 5 rows split unevenly over the backward programs (one of 5 rows' programs is empty)
    compare(shape, dtype)


@pytest.mark.parametrize("x_dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_fp32_weight_on_half_input_gives_fp32_output_rounded_like_the_module(x_dtype):
    out, _, grad_w = compare((7, 200), x_dtype=x_dtype, w_dtype=F32)
    assert out.dtype == F32 and grad_w.dtype == F32


def test_eps_is_used():
    # x of rms 0.05 against eps 0.01: eps dominates the denominator
    compare((6, 96), eps=1e-2, x_scale=0.05)


@pytest.mark.parametrize("x_grad,w_grad", [(True, False), (False, True)], ids=["frozen_weight", "frozen_x"])
def test_only_the_needed_gradients(x_grad, w_grad):
    _, grad_x, grad_w = compare((9, 200), BF16, x_grad=x_grad, w_grad=w_grad)
    assert (grad_x is not None, grad_w is not None) == (x_grad, w_grad)


def test_strided_rows_read_in_place_and_their_padding_ignored():
    # x and grad_out are the first 200 columns of 256-wide buffers padded with 1e4: a wrong mask
    # or row stride would put the padding into the sums
    n, d = 11, 200
    g = torch.Generator().manual_seed(3)
    x_buf = torch.full((n, 256), 1e4)
    x_buf[:, :d] = torch.randn(n, d, generator=g)
    g_buf = torch.full((n, 256), 1e4)
    g_buf[:, :d] = torch.randn(n, d, generator=g)
    x = x_buf[:, :d].requires_grad_()
    weight = torch.nn.Parameter(torch.rand(d, generator=g) + 0.5)
    module = LlamaRMSNorm(d)
    with torch.no_grad():
        module.weight.copy_(weight)
    want = run(module, x, module.weight, g_buf[:, :d])
    got = run(lambda t: rms_norm(t, weight, 1e-6), x, weight, g_buf[:, :d])
    for a, e in zip(got, want, strict=True):
        assert_matches(a, e)


def test_backward_keeps_x_and_one_float_per_row():
    x = torch.randn(3, 5, 96, dtype=BF16, requires_grad=True)
    weight = torch.nn.Parameter(torch.ones(96, dtype=BF16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, 1e-6)
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((15, 96), BF16), ((96,), BF16), ((15,), F32)]
    assert saved[0].data_ptr() == x.data_ptr() and saved[1] is weight


def message(text):
    return "^" + re.escape(text) + "$"


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match=message(
        "rms_norm kernel: x has dtype torch.float64; the kernel supports float32, bfloat16 and float16, "
        "use the PyTorch path (LlamaRMSNorm) for others"
    )):
        rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-6)


def test_weight_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=message(
        "rms_norm kernel: weight of shape (7,) does not match x of shape (2, 8): weight must be 1-D "
        "with the size of x's last dim"
    )):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


def test_too_wide_rows_are_refused():
    with pytest.raises(ValueError, match=message(
        "rms_norm kernel: rows of width 65537 exceed the kernel's 65536; use the PyTorch path (LlamaRMSNorm)"
    )):
        rms_norm(torch.randn(1, 65537), torch.ones(65537), 1e-6)


def test_compiled_kernel_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(kernel, "_INTERPRETED", False)
    with pytest.raises(ValueError, match=message(
        "rms_norm kernel: x is on cpu, the kernel needs CUDA tensors; use the PyTorch path "
        "(LlamaRMSNorm) on CPU"
    )):
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_on_cuda(dtype):
    for shape in [(17, 200), (2, 3, 5, 96), (300, 4096)]:
        compare(shape, dtype, device="cuda")
    compare((33, 1376), BF16, F32, device="cuda")
    compare((33, 1376), dtype, w_grad=False, device="cuda")
