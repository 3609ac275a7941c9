"""The Triton cross-entropy kernel (lorakit.kernels.cross_entropy), run in Triton's interpreter on
CPU (tests/conftest.py), against PyTorch: per-row losses, the gradient it writes over the logits,
and the chunked loss with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import cross_entropy as xent
from lorakit.ops.chunked_ce import chunked_cross_entropy

# fp32: the same math. bf16: the fp32 gradient cast once to bf16, which Triton's interpreter does by
# truncation (a GPU rounds to nearest): within one bf16 unit in the last place, 2^-7 relative.
BF16_ONE_ULP = dict(rtol=2**-7, atol=1e-6)


def logits_and_targets(rows, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(rows, vocab, generator=g)).to(dtype)
    return z, torch.randint(0, vocab, (rows,), generator=g)


def reference(z, t):
    """Per-row loss and softmax - one_hot, in fp32 from the same (rounded) logits."""
    z32 = z.float().requires_grad_()
    loss = F.cross_entropy(z32, t, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), z32)
    return loss.detach(), grad


@pytest.mark.parametrize("block", [64, xent.BLOCK], ids=["several_blocks", "one_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_losses_and_gradient_over_the_logits(monkeypatch, block, dtype):
    monkeypatch.setattr(xent, "BLOCK", block)
    z, t = logits_and_targets(7, 300, dtype)       # 300: not a multiple of the block, masks matter
    t[0] = 299                                     # the last logit, in the masked tail block
    want_loss, want_grad = reference(z, t)
    loss = xent.cross_entropy_rows_(z, t, write_grad=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert z.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else BF16_ONE_ULP
    torch.testing.assert_close(z.float(), want_grad, **tol)


def test_without_the_gradient_the_logits_are_left_alone():
    z, t = logits_and_targets(5, 100, torch.float32)
    before = z.clone()
    loss = xent.cross_entropy_rows_(z, t, write_grad=False)
    torch.testing.assert_close(loss, reference(before, t)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(z, before)


def test_bad_shapes_are_refused():
    z, t = logits_and_targets(4, 10, torch.float32)
    with pytest.raises(ValueError, match=r"^cross_entropy_rows_: logits \(10, 4\) must be \(rows, vocab\) "
                                         r"with contiguous rows$"):
        xent.cross_entropy_rows_(z.t(), t, write_grad=True)
    with pytest.raises(ValueError, match=r"^cross_entropy_rows_: targets \(3,\) must be \(4,\)$"):
        xent.cross_entropy_rows_(z, t[:3], write_grad=True)


def chunked_inputs(dtype, bias):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 24, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(130, 24, generator=g) / 5).to(dtype).requires_grad_()
    b = torch.randn(130, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, 130, (40,), generator=g)
    t[::4] = -100
    return h, w, b, t


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_loss_with_the_kernel_equals_the_pytorch_path(dtype, bias):
    h, w, b, t = chunked_inputs(dtype, bias)
    wrt = [x for x in (h, w, b) if x is not None]
    results = []
    for kernel in (False, True):
        loss = chunked_cross_entropy(h, w, t, b, chunk_rows=8, kernel=kernel)
        results.append((loss, torch.autograd.grad(loss, wrt)))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(got_g, want_g, strict=True):
        assert g_got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
        else:   # the same bf16 gradient chunks; the bias sums them in fp32 from bf16 here, from fp32 there
            torch.testing.assert_close(g_got, g_want, rtol=2e-2, atol=2e-2 * g_want.abs().max().item())


def test_chunked_loss_kernel_refuses_fp64():
    h, w, b, t = chunked_inputs(torch.float64, False)
    with pytest.raises(ValueError, match=r"^chunked_cross_entropy: the Triton kernel takes torch.float32, "
                                         r"torch.bfloat16, torch.float16, not torch.float64; use kernel=False$"):
        chunked_cross_entropy(h, w, t, kernel=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_cuda(dtype):
    z, t = logits_and_targets(64, 32000, dtype)
    z, t = z.cuda(), t.cuda()
    want_loss, want_grad = reference(z, t)
    loss = xent.cross_entropy_rows_(z, t, write_grad=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-5)   # rounded
    torch.testing.assert_close(z.float(), want_grad, **tol)
