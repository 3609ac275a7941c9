"""`lorakit.train.kernel_check`: the check each run makes of the kernels on its device passes for
the real kernels (here in Triton's interpreter) and names the kernel that is wrong or fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import swiglu as swiglu_module
from lorakit.train import kernel_check as selfcheck

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache():
    selfcheck.self_check.cache_clear()
    yield
    selfcheck.self_check.cache_clear()


def test_the_kernels_pass():
    assert selfcheck.self_check(CPU) is None


def test_the_check_runs_under_no_grad_too():
    with torch.no_grad():
        assert selfcheck.self_check(CPU) is None


def test_a_wrong_kernel_is_named(monkeypatch):
    monkeypatch.setattr(swiglu_module, "swiglu", lambda g, u: F.silu(g) * u * 1.05)
    assert selfcheck.self_check(CPU) == "swiglu (torch.float32) differs from its PyTorch reference"


def test_a_wrong_gradient_is_caught(monkeypatch):
    class NoGateGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g, u):
            ctx.save_for_backward(g, u)
            return F.silu(g) * u

        @staticmethod
        def backward(ctx, grad):
            g, u = ctx.saved_tensors
            return torch.zeros_like(g), grad * F.silu(g)
    monkeypatch.setattr(swiglu_module, "swiglu", NoGateGradient.apply)
    assert selfcheck.self_check(CPU) == "swiglu (torch.float32) differs from its PyTorch reference"


def test_a_failing_kernel_is_reported(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX compilation failed")
    monkeypatch.setattr(swiglu_module, "swiglu", broken)
    assert selfcheck.self_check(CPU) == "RuntimeError: PTX compilation failed"


def test_a_wrong_loss_kernel_is_named(monkeypatch):
    from lorakit.kernels import cross_entropy

    real = cross_entropy.cross_entropy_rows_
    monkeypatch.setattr(cross_entropy, "cross_entropy_rows_", lambda z, t, write_grad: real(z, t, write_grad) + 0.1)
    assert selfcheck.self_check(CPU) == "cross_entropy (torch.float32) differs from F.cross_entropy"


def test_a_wrong_dropout_kernel_is_named(monkeypatch):
    from lorakit.kernels import dropout

    real = dropout.dropout_pack
    monkeypatch.setattr(dropout, "dropout_pack", lambda x, p, seed: (x.clone(), real(x, p, seed)[1]))
    problem = selfcheck.self_check(CPU)
    assert problem.startswith("dropout (torch.float32) differs from its mask's bits (kept 0.")
