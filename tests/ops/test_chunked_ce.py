"""`lorakit.ops.chunked_cross_entropy`: the summed cross-entropy of a linear head, a chunk of rows
at a time. Reference throughout: `F.cross_entropy(F.linear(h, W, b).float(), t, reduction="sum")`."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.chunked_ce import (
    MIN_CHUNK_ROWS,
    _ChunkedCrossEntropy,
    chunked_cross_entropy,
    default_chunk_rows,
)
from lorakit.train.memory import PeakMemory

N, D, V = 50, 16, 300


def inputs(dtype=torch.float32, bias=True, n=N, d=D, v=V, ignore_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t


def plain(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100, reduction="sum")


def loss_and_grads(fn, h, w, b, t):
    loss = fn(h, w, b, t)
    wrt = [x for x in (h, w, b) if x is not None]
    return loss, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, N, 4 * N], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fp32_loss_and_gradients_equal_the_plain_path(chunk_rows, bias):
    h, w, b, t = inputs(bias=bias)
    want, want_g = loss_and_grads(plain, h, w, b, t)
    got, got_g = loss_and_grads(lambda *a: chunked_cross_entropy(a[0], a[1], a[3], a[2], chunk_rows), h, w, b, t)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g_got, g_want in zip("hwb"[:len(want_g)], got_g, want_g, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_gradcheck_float64():
    h, w, b, t = inputs(torch.float64, n=9, d=4, v=11)

    def f(h, w, b):
        return _ChunkedCrossEntropy.apply(h, w, b, t, 2, -100, True, False)

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-6)


def test_bf16_is_within_the_plain_paths_rounding():
    """bf16 logits either way: each path's error against fp64 is of the same size, and the two agree
    to bf16 precision."""
    h, w, b, t = inputs(torch.bfloat16)
    exact, exact_g = loss_and_grads(plain, *(x.detach().double().requires_grad_() for x in (h, w, b)), t)
    want, want_g = loss_and_grads(plain, h, w, b, t)
    got, got_g = loss_and_grads(lambda *a: chunked_cross_entropy(a[0], a[1], a[3], a[2], 7), h, w, b, t)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    assert abs(got.double() - exact) <= 2 * abs(want.double() - exact) + 1e-3 * abs(exact)
    for g_got, g_want, g_exact in zip(got_g, want_g, exact_g, strict=True):
        assert g_got.dtype == torch.bfloat16
        err_got = (g_got.double() - g_exact).abs().max()
        err_want = (g_want.double() - g_exact).abs().max()
        assert err_got <= 2 * err_want + 1e-6, (err_got, err_want)
        torch.testing.assert_close(g_got, g_want, rtol=2e-2, atol=2e-2 * g_exact.abs().max().item())


def test_ignored_rows_get_zero_gradient_and_cost_nothing():
    h, w, b, t = inputs(ignore_every=0)
    t[10:30] = -100                        # whole chunks of ignored rows (chunk_rows=8)
    loss, (gh, gw, gb) = loss_and_grads(lambda *a: chunked_cross_entropy(a[0], a[1], a[3], a[2], 8), h, w, b, t)
    want, want_g = loss_and_grads(plain, h, w, b, t)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gh[10:30], torch.zeros(20, D))
    for g_got, g_want in zip((gh, gw, gb), want_g, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_all_rows_ignored():
    h, w, b, t = inputs()
    t[:] = -100
    loss, grads = loss_and_grads(lambda *a: chunked_cross_entropy(a[0], a[1], a[3], a[2]), h, w, b, t)
    assert loss.item() == 0.0 and plain(h, w, b, t).item() == 0.0
    for g, x in zip(grads, (h, w, b), strict=True):
        assert torch.equal(g, torch.zeros_like(x))


def test_frozen_weight_gets_no_gradient():
    h, w, b, t = inputs(bias=False)
    w.requires_grad_(False)
    chunked_cross_entropy(h, w, t, chunk_rows=5).backward()
    assert w.grad is None and h.grad is not None


def test_default_chunk_rows():
    # a chunk's logits hold about as many elements as all the hidden states
    assert default_chunk_rows(16384, 8000, 512) == 1024          # ceil(8000/512) = 16 chunks
    assert default_chunk_rows(32768, 128256, 4096) == 1024        # 32 chunks
    assert default_chunk_rows(1024, 8000, 512) == MIN_CHUNK_ROWS   # never tiny matmuls
    assert default_chunk_rows(1000, 100, 512) == 1000              # vocab below hidden: one chunk


@pytest.mark.parametrize("args, message", [
    (dict(hidden=torch.zeros(3, 4, 2)), "hidden (3, 4, 2) and weight (5, 4) must be (N, d) and (V, d)"),
    (dict(targets=torch.zeros(2, dtype=torch.long)), "targets (2,) must be (3,), one per row of hidden"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), "must share the compute dtype"),
    (dict(chunk_rows=0), "chunk_rows must be >= 1, got 0"),
])
def test_bad_arguments(args, message):
    call = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(5, 4), targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape(message)):
        chunked_cross_entropy(**{**call, **args})


def test_peak_memory_is_a_chunk_not_the_full_logits():
    """Vocabulary large against the hidden size: the full logits (N x V fp32) dominate the plain path
    (logits, log-softmax, their gradient); the chunked one holds a few chunks of rows at most."""
    n, d, v = 512, 16, 8192
    h, w, b, t = inputs(n=n, d=d, v=v, ignore_every=0, bias=False)
    w.requires_grad_(False)
    logits_bytes = n * v * 4                                       # 16 MiB
    chunk = 32                                                     # 1 MiB of logits
    held = sum(x.untyped_storage().nbytes() for x in (h, w, t))

    def peak(fn):
        meter = PeakMemory("cpu")
        with meter.region(h, w, t):
            fn(h, w, None, t).backward()
        h.grad = None
        return meter.peak_bytes

    plain_peak = peak(plain)
    chunked_peak = peak(lambda h, w, b, t: chunked_cross_entropy(h, w, t, chunk_rows=chunk))
    assert plain_peak > held + 2 * logits_bytes
    assert chunked_peak < held + 4 * chunk * v * 4 + 4 * h.numel() * 4
    assert chunked_peak < plain_peak / 8


@pytest.mark.parametrize("bad", [V, -5])
def test_targets_outside_the_vocabulary_are_refused(bad):
    h, w, b, t = inputs()
    t[4] = bad
    with pytest.raises(ValueError, match=re.escape(
            f"chunked_cross_entropy: target {bad} is outside the vocabulary of the head ({V} rows) and is not "
            "ignore_index (-100); resize the model's embeddings to the tokenizer (model.resize_token_embeddings)")):
        chunked_cross_entropy(h, w, t, b)


def test_bf16_gradient_scale_is_not_rounded():
    """The loop divides the summed loss by the trained-token count; that fp32 factor scales the
    gradient as it is, not rounded to bf16 first (1/777 in bf16 is 0.2% off)."""
    h, w, b, t = inputs(torch.bfloat16, ignore_every=0)
    (g1,) = torch.autograd.grad(chunked_cross_entropy(h, w, t, b), h)
    (g777,) = torch.autograd.grad(chunked_cross_entropy(h, w, t, b) / 777, h)
    torch.testing.assert_close(g777, (g1.float() / 777).to(torch.bfloat16), rtol=0, atol=0)


def test_differentiating_twice_is_refused():
    """A gradient of the gradient would silently be zero (backward only scales what forward made):
    autograd says so instead."""
    h, w, b, t = inputs(n=8)
    scale = torch.tensor(2.0, requires_grad=True)     # so that the gradient has a graph to refuse
    (g,) = torch.autograd.grad(chunked_cross_entropy(h, w, t, b) * scale, h, create_graph=True)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked "
                                           "with @once_differentiable"):
        (g * g).sum().backward()
