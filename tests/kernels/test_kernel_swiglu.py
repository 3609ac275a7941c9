"""The Triton SwiGLU product (lorakit.kernels.swiglu), run in Triton's interpreter on CPU
(tests/conftest.py), against `F.silu(gate) * up` (transformers' Llama MLP): output and both
gradients."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import triton

from lorakit.kernels import swiglu as kernel
from lorakit.kernels.swiglu import swiglu

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def assert_matches(actual, expected):
    """fp32: the same math (sigmoid's last bit aside). fp16: the kernel rounds where PyTorch rounds
    (silu(gate), then the product; g * up in backward), so all elements but the few where the last
    fp32 bit of sigmoid tips a rounding are equal (a kernel skipping one of those roundings differs
    in about a quarter of them), and those within one unit in the last place, 2^-10 relative.
    bf16: one unit, 2^-7, plus Triton's interpreter, which casts fp32 to bf16 by truncation (a GPU
    rounds to nearest): 2^-6 of the tensor's scale. A wrong mask is off by O(1) of that scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == F32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    rel = 2**-10 if expected.dtype == F16 else 2**-6
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)
    if expected.dtype == F16:
        assert (actual != expected).float().mean().item() <= 0.01


def run(fn, gate, up, grad_out):
    """out, grad_gate, grad_up of fn(gate, up) (None for an input that needs no grad)."""
    out = fn(gate, up)
    wrt = [t for t in (gate, up) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return out, *(next(grads) if t.requires_grad else None for t in (gate, up))


def compare(shape, dtype=F32, gate_scale=3.0, gate_grad=True, up_grad=True, device="cpu", seed=0,
            layout=lambda t: t):
    g = torch.Generator().manual_seed(seed)
    gate = layout((gate_scale * torch.randn(shape, generator=g)).to(device, dtype)).requires_grad_(gate_grad)
    up = layout(torch.randn(shape, generator=g).to(device, dtype)).requires_grad_(up_grad)
    grad_out = layout(torch.randn(shape, generator=g).to(device, dtype))
    want = run(lambda a, b: F.silu(a) * b, gate, up, grad_out)
    got = run(swiglu, gate, up, grad_out)
    for a, e in zip(got, want, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert_matches(a, e)
    return got


@pytest.mark.parametrize("shape", [(17, 200), (2, 3, 5, 96), (3, 1376), (7,)],
                         ids=["2d", "4d", "wide", "tiny"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_output_and_gradients_match_silu_times_up(shape, dtype):
    # 3400, 1440, 4128 and 7 elements: none a multiple of the 1024-element block, the tail is masked
    compare(shape, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_large_gates_saturate_without_overflow(dtype):
    # |gate| up to ~90: sigmoid saturates to 0 or 1, exp(-gate) overflows fp32 for gate < -88
    out, grad_gate, grad_up = compare((5, 200), dtype, gate_scale=30.0)
    assert all(torch.isfinite(t).all() for t in (out, grad_gate, grad_up))


@pytest.mark.parametrize("gate_grad,up_grad", [(True, False), (False, True)], ids=["gate_only", "up_only"])
def test_only_the_needed_gradients(gate_grad, up_grad):
    _, grad_gate, grad_up = compare((9, 200), BF16, gate_grad=gate_grad, up_grad=up_grad)
    assert (grad_gate is not None, grad_up is not None) == (gate_grad, up_grad)


def test_non_contiguous_inputs():
    compare((24, 40), F32, layout=lambda t: t.t())  # (40, 24) transposed views


def test_kernels_write_nothing_past_the_last_element():
    # the kernels themselves, their outputs the head of buffers whose tail must stay untouched
    n, pad = 1500, 600  # the second block covers elements 1024..2047: 548 of them masked off
    g = torch.Generator().manual_seed(2)
    gate, up, grad = (torch.randn(n, generator=g) for _ in range(3))
    out, dgate, dup = (torch.full((n + pad,), 7.0) for _ in range(3))
    grid = (triton.cdiv(n, kernel.BLOCK),)
    kernel._swiglu_fwd[grid](gate, up, out, n, BLOCK=kernel.BLOCK)
    kernel._swiglu_bwd[grid](gate, up, grad, dgate, dup, n, BLOCK=kernel.BLOCK)
    want = run(lambda a, b: F.silu(a) * b, gate.requires_grad_(), up.requires_grad_(), grad)
    for buf, e in zip((out, dgate, dup), want, strict=True):
        assert_matches(buf[:n], e)
        assert (buf[n:] == 7.0).all()


def test_backward_keeps_gate_and_up_only():
    gate = torch.randn(3, 5, 96, dtype=BF16, requires_grad=True)
    up = torch.randn(3, 5, 96, dtype=BF16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]


def message(text):
    return "^" + re.escape(text) + "$"


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match=message(
        "swiglu kernel: gate has dtype torch.float64; the kernel supports float32, bfloat16 and float16, "
        "use the PyTorch path (F.silu(gate) * up) for others"
    )):
        swiglu(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64))


@pytest.mark.parametrize("up", [torch.randn(2, 5), torch.randn(2, 4, dtype=BF16)], ids=["shape", "dtype"])
def test_mismatched_inputs_are_refused(up):
    with pytest.raises(ValueError, match=message(
        f"swiglu kernel: gate (2, 4) torch.float32 on cpu and up {tuple(up.shape)} {up.dtype} on cpu "
        "must have the same shape, dtype and device"
    )):
        swiglu(torch.randn(2, 4), up)


def test_compiled_kernel_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(kernel, "_INTERPRETED", False)
    with pytest.raises(ValueError, match=message(
        "swiglu kernel: gate is on cpu, the kernel needs CUDA tensors; use the PyTorch path "
        "(F.silu(gate) * up) on CPU"
    )):
        swiglu(torch.randn(4), torch.randn(4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_on_cuda(dtype):
    for shape in [(17, 200), (2, 3, 5, 96), (300, 11008)]:
        compare(shape, dtype, device="cuda")
    compare((33, 1376), dtype, gate_scale=30.0, device="cuda")
