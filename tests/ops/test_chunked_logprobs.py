"""`lorakit.ops.chunked_logprobs`: per-row log-probabilities of a linear head's targets, a chunk of
rows at a time. Reference: `log_softmax(F.linear(h, W, b).float() / tau).gather(t)`."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.chunked_logprobs import chunked_logprobs
from lorakit.train.memory import PeakMemory

N, D, V = 50, 16, 300


def inputs(dtype=torch.float32, n=N, d=D, v=V, head_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_(head_grad)
    b = torch.randn(v, generator=g).to(dtype).requires_grad_(head_grad)
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, b, t


def plain(h, w, b, t, temperature=1.0):
    z = F.linear(h, w, b).float() / temperature
    return torch.log_softmax(z, dim=1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("head_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [7, 50, 64])
def test_values_and_gradients_equal_the_plain_path(head_grad, temperature, chunk_rows):
    """Frozen head: the gradient of h made in forward; training head: backward recomputes chunks."""
    h, w, b, t = inputs(head_grad=head_grad)
    g = torch.randn(N, generator=torch.Generator().manual_seed(1))   # a per-row upstream gradient
    wrt = [h, w, b] if head_grad else [h]
    expected = plain(h, w, b, t, temperature)
    got = chunked_logprobs(h, w, t, b, temperature, chunk_rows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for a, e in zip(torch.autograd.grad((got * g).sum(), wrt), torch.autograd.grad((expected * g).sum(), wrt),
                    strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_grad", [False, True])
def test_gradcheck_float64(head_grad):
    h, w, b, t = inputs(torch.float64, n=9, d=4, v=11, head_grad=head_grad)
    fn = (lambda h, w, b: chunked_logprobs(h, w, t, b, 0.9, 4)) if head_grad else \
        (lambda h: chunked_logprobs(h, w, t, b, 0.9, 4))
    assert torch.autograd.gradcheck(fn, (h, w, b) if head_grad else (h,))


def test_no_grad_gives_values_only():
    h, w, b, t = inputs()
    with torch.no_grad():
        got = chunked_logprobs(h, w, t, b)
    assert not got.requires_grad
    torch.testing.assert_close(got, plain(h, w, b, t).detach(), rtol=0, atol=1e-6)


def test_bf16_is_within_the_plain_paths_rounding():
    h, w, b, t = inputs(torch.bfloat16)
    got, expected = chunked_logprobs(h, w, t, b, chunk_rows=16), plain(h, w, b, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)


def test_bad_shapes_are_refused():
    h, w, b, t = inputs()
    with pytest.raises(ValueError, match=re.escape("chunked_logprobs: hidden (50, 16) and weight (300, 15) must be "
                                                   "(n, d) and (V, d)")):
        chunked_logprobs(h, w[:, :15], t)
    with pytest.raises(ValueError, match=re.escape("chunked_logprobs: targets (49,) must be (50,)")):
        chunked_logprobs(h, w, t[:49])


def test_peak_memory_is_a_chunk_not_the_full_logits():
    """The plain path holds the (n, V) fp32 logits, their log-softmax and its gradient; the chunked
    one a chunk of them and the (n, d) gradient of h."""
    n, d, v = 512, 16, 8192
    h, w, b, t = inputs(n=n, d=d, v=v)
    chunk = 32
    held = sum(x.untyped_storage().nbytes() for x in (h, w, t))

    def peak(fn):
        meter = PeakMemory("cpu")
        with meter.region(h, w, t):
            fn().sum().backward()
        h.grad = None
        return meter.peak_bytes

    plain_peak = peak(lambda: plain(h, w, None, t))
    chunked_peak = peak(lambda: chunked_logprobs(h, w, t, chunk_rows=chunk))
    assert plain_peak > held + 2 * n * v * 4
    assert chunked_peak < held + 4 * chunk * v * 4 + 4 * h.numel() * 4
    assert chunked_peak < plain_peak / 8
