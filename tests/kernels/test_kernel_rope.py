"""The Triton rotary embedding (lorakit.kernels.rope), run in Triton's interpreter on CPU
(tests/conftest.py), against transformers' `apply_rotary_pos_emb`: both embeddings and the
gradients of q and k, in both layouts, with grouped-query heads."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lorakit.kernels import rope as kernel
from lorakit.kernels.rope import rope

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def assert_matches(actual, expected):
    """fp32 and fp16: equal, as the kernel rounds each product and the sum where PyTorch rounds
    them (up to fp32 noise, for a GPU's fused multiply-adds). bf16: one unit in the last place of
    each of those roundings, 2^-7, and Triton's interpreter casts fp32 to bf16 by truncation (a
    GPU rounds to nearest): 2^-6 of the tensor's scale. A wrong mask, stride or sign is off by
    O(1) of that scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.abs().max().item()
    rel = {F32: 1e-6, F16: 1e-6, BF16: 2**-6}[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


def llama_tables(batch, seq, head_dim, position_ids=None, dtype=F32, device="cpu"):
    """cos, sin (batch or 1, seq, head_dim) from Llama's rotary module, in x's dtype as Llama has them."""
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    if position_ids is None:
        position_ids = torch.arange(seq)[None]
    x = torch.zeros(batch, seq, 4 * head_dim, dtype=dtype, device=device)
    return rotary(x, position_ids.to(device))


def random_tables(batch, seq, head_dim, dtype=F32, device="cpu", seed=1):
    """General cos, sin whose halves differ, unlike Llama's: the backward must be the true transpose
    (a 'forward with -sin' backward passes with Llama's tables only)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, head_dim, generator=g).to(device, dtype) for _ in range(2))


def make_qk(B, S, Hq, Hk, D, dtype, layout, device="cpu", seed=0):
    """q (B, Hq, S, D) and k (B, Hk, S, D) as the attention module has them for layout 'bhsd':
    transposed views of the projections' (B, S, H, D) outputs, sliced out of one fused buffer so
    they are not even dense; for 'bshd' plain (B, S, H, D) tensors (unsqueeze_dim=2)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        return (torch.randn(B, S, h, D, generator=g).to(device, dtype).requires_grad_() for h in (Hq, Hk))
    fused = torch.randn(B, S, Hq + Hk + 1, D, generator=g).to(device, dtype)  # a third head: v
    q = fused[:, :, :Hq].transpose(1, 2).detach().requires_grad_()
    k = fused[:, :, Hq:Hq + Hk].transpose(1, 2).detach().requires_grad_()
    return q, k


def run(fn, q, k, grads):
    """q_embed, k_embed, grad_q, grad_k (None for an input that needs no grad)."""
    outs = fn(q, k)
    assert [o.requires_grad for o in outs] == [q.requires_grad, k.requires_grad]
    wrt = [t for t in (q, k) if t.requires_grad]
    got = iter(torch.autograd.grad([o for o in outs if o.requires_grad], wrt,
                                   [g for o, g in zip(outs, grads, strict=True) if o.requires_grad]))
    return *outs, *(next(got) if t.requires_grad else None for t in (q, k))


def compare(q, k, cos, sin, unsqueeze_dim):
    g = torch.Generator().manual_seed(5)
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    grads = [torch.randn(t.shape, generator=g).to(t.device, out_dtype) for t in (q, k)]
    want = run(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, unsqueeze_dim), q, k, grads)
    got = run(lambda a, b: rope(a, b, cos, sin, unsqueeze_dim), q, k, grads)
    for a, e in zip(got, want, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert_matches(a, e)
    return got


LAYOUTS = [("bhsd", 1), ("bshd", 2)]


@pytest.mark.parametrize("layout,unsqueeze_dim", LAYOUTS, ids=["bhsd_dim1", "bshd_dim2"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("tables", ["llama", "random"])
def test_embeddings_and_gradients_match_apply_rotary_pos_emb(layout, unsqueeze_dim, dtype, tables):
    # 6 query and 2 key heads (GQA, 6 not a power of two), D = 24: halves of 12 in blocks of 16
    B, S, Hq, Hk, D = 2, 7, 6, 2, 24
    q, k = make_qk(B, S, Hq, Hk, D, dtype, layout)
    make = llama_tables if tables == "llama" else random_tables
    cos, sin = make(1, S, D, dtype=dtype)
    compare(q, k, cos, sin, unsqueeze_dim)


@pytest.mark.parametrize("layout,unsqueeze_dim", LAYOUTS, ids=["bhsd_dim1", "bshd_dim2"])
def test_per_sequence_positions(layout, unsqueeze_dim):
    # cos, sin with a batch dim (each sequence its own positions, as with packing or left padding)
    B, S, D = 3, 5, 64
    position_ids = torch.stack([torch.arange(S), torch.arange(S) + 9, torch.tensor([0, 1, 0, 1, 2])])
    cos, sin = llama_tables(B, S, D, position_ids)
    assert cos.shape == (B, S, D)
    compare(*make_qk(B, S, 4, 4, D, F32, layout), cos, sin, unsqueeze_dim)


def test_negative_unsqueeze_dims_name_the_same_layouts():
    cos, sin = random_tables(1, 4, 16)
    compare(*make_qk(2, 4, 3, 1, 16, F32, "bhsd"), cos, sin, -3)
    compare(*make_qk(2, 4, 3, 1, 16, F32, "bshd"), cos, sin, -2)


def test_fp32_tables_on_bf16_heads_give_fp32_embeddings():
    q, k = make_qk(2, 5, 4, 2, 16, BF16, "bhsd")
    q_embed, _, grad_q, _ = compare(q, k, *llama_tables(1, 5, 16), unsqueeze_dim=1)
    assert q_embed.dtype == F32 and grad_q.dtype == BF16


def test_only_the_needed_gradients():
    q, k = make_qk(2, 5, 4, 2, 16, F32, "bshd")
    k.requires_grad_(False)
    *_, grad_q, grad_k = compare(q, k, *random_tables(2, 5, 16), unsqueeze_dim=2)
    assert grad_q is not None and grad_k is None


def test_outputs_take_the_layout_of_dense_inputs():
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    k = torch.randn(2, 2, 5, 16)
    q_embed, k_embed = rope(q, k, *llama_tables(1, 5, 16), unsqueeze_dim=1)
    assert q_embed.stride() == q.stride() and k_embed.stride() == k.stride()


def test_backward_keeps_cos_and_sin_only():
    q, k = make_qk(2, 5, 4, 2, 16, BF16, "bhsd")
    cos, sin = llama_tables(1, 5, 16, dtype=BF16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rope(q, k, cos, sin)
    assert [t.data_ptr() for t in saved] == [cos.data_ptr(), sin.data_ptr()]


def message(text):
    return "^" + re.escape(text) + "$"


def test_odd_head_dim_is_refused():
    q, k, cos = torch.randn(1, 2, 3, 5), torch.randn(1, 1, 3, 5), torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match=message(
        "rope kernel: the head dim D=5 must be even (rotate_half splits it in halves): q (1, 2, 3, 5), "
        "k (1, 1, 3, 5), cos (1, 3, 5), sin (1, 3, 5) with unsqueeze_dim=1"
    )):
        rope(q, k, cos, cos)


def test_mismatched_shapes_are_refused():
    q, k, cos = torch.randn(2, 2, 3, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=message(
        "rope kernel: shapes do not match (B, S, D) = (2, 3, 8): q (2, 2, 3, 8), k (2, 1, 3, 8), "
        "cos (2, 4, 8), sin (2, 4, 8) with unsqueeze_dim=1"
    )):
        rope(q, k, cos, cos)


def test_too_many_heads_for_one_tile_are_refused():
    q, k, cos = torch.empty(1, 1024, 1, 256), torch.empty(1, 8, 1, 256), torch.empty(1, 1, 256)
    with pytest.raises(ValueError, match=message(
        "rope kernel: heads x D/2 exceeds the kernel's tile of 65536 elements: q (1, 1024, 1, 256), "
        "k (1, 8, 1, 256), cos (1, 1, 256), sin (1, 1, 256) with unsqueeze_dim=1; use the PyTorch path "
        "(apply_rotary_pos_emb)"
    )):
        rope(q, k, cos, cos)


def test_unsupported_unsqueeze_dim_is_refused():
    q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=message(
        "rope kernel: unsqueeze_dim=0 is not supported: use 1 for q, k of shape (B, H, S, D) or 2 for "
        "(B, S, H, D)"
    )):
        rope(q, q, cos, cos, unsqueeze_dim=0)


def test_unsupported_dtype_is_refused():
    q, cos = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=message(
        "rope kernel: q has dtype torch.float64; the kernel supports float32, bfloat16 and float16, use "
        "the PyTorch path (apply_rotary_pos_emb) for others"
    )):
        rope(q, q, cos, cos)


def test_tables_that_require_grad_are_refused():
    q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match=message(
        "rope kernel: cos or sin requires grad, but the kernel gives them no gradient (Llama's rotary "
        "tables are computed without one); detach them, or use apply_rotary_pos_emb"
    )):
        rope(q, q, cos, cos.detach())
    with torch.no_grad():
        rope(q, q, cos, cos)  # no graph, no gradient owed


def test_compiled_kernel_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(kernel, "_INTERPRETED", False)
    q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=message(
        "rope kernel: q is on cpu, the kernel needs CUDA tensors; use the PyTorch path "
        "(apply_rotary_pos_emb) on CPU"
    )):
        rope(q, q, cos, cos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_on_cuda(dtype):
    for layout, unsqueeze_dim in LAYOUTS:
        q, k = make_qk(2, 300, 32, 8, 128, dtype, layout, device="cuda")
        compare(q, k, *llama_tables(1, 300, 128, dtype=dtype, device="cuda"), unsqueeze_dim)
        q, k = make_qk(2, 7, 6, 2, 24, dtype, layout, device="cuda")
        compare(q, k, *random_tables(2, 7, 24, dtype=dtype, device="cuda"), unsqueeze_dim)
