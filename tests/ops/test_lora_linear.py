"""`lorakit.ops.lora_linear`: the fused, in-place LoRA term of a linear layer.

Reference throughout is the plain composition `out + s * (dropout(x) @ A^T @ B^T + b)`, with the
dropout mask taken from the module's own `_keep` helper for the same seed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lorakit as lk
from lorakit.ops import lora_linear_
from lorakit.ops.lora_linear import _keep, _LoraLinear

D_IN, D_OUT, R = 7, 5, 3
S = 1.5
SHAPES = pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["x2d", "x3d"])


def tensors(lead, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return {"out0": mk(*lead, D_OUT), "x": mk(*lead, D_IN), "A": mk(R, D_IN), "B": mk(D_OUT, R),
            "b": mk(D_OUT) if bias else None}


def plain(out0, x, A, B, b, s=S, mask=None):
    xd = x if mask is None else x * mask
    y = xd @ A.t() @ B.t()
    if b is not None:
        y = y + b
    return out0 + s * y


def fused(out0, x, A, B, b, s=S, p=0.0, seed=None):
    out = out0 * 1  # a fresh non-leaf output, as a base layer would return
    if seed is None:
        return lora_linear_(out, x, A=A, B=B, bias=b, scaling=s, dropout=p)
    return _LoraLinear.apply(out, x, A, B, b, s, p, seed)


def grads(y, t, g):
    inputs = [v for v in (t["out0"], t["x"], t["A"], t["B"], t["b"]) if v is not None]
    return torch.autograd.grad((y * g).sum(), inputs)


def mask_for(x, p, seed):
    """The mask (already divided by 1 - p) `_LoraLinear` draws for input `x` and `seed`."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    return _keep(x2.shape, x2.device, p, seed).to(x2.dtype).div_(1 - p).view(x.shape)


# ---- forward and backward vs the plain composition ------------------------------------------------


@SHAPES
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_grads_equal_the_plain_composition(lead, bias):
    t = tensors(lead, bias=bias)
    y = fused(**t)
    ref = plain(**t)
    assert y.shape == (*lead, D_OUT)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    for got, want in zip(grads(y, t, g), grads(ref, t, g), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_adds_in_place_into_a_contiguous_out():
    t = tensors((4,))
    with torch.no_grad():
        out = t["out0"].clone()
        y = lora_linear_(out, t["x"], A=t["A"], B=t["B"], bias=t["b"], scaling=S, dropout=0.0)
    assert y is out
    torch.testing.assert_close(out, plain(**t).detach(), atol=1e-6, rtol=0)


def test_hand_case():
    # x = [1, 2], A = [[1, 1]] (r=1), B = [[2], [-1]], b = [1, 0], s = 0.5, out = [10, 20]
    # x A^T = 3; B (3) = [6, -3]; + b = [7, -3]; * 0.5 = [3.5, -1.5]
    out = torch.tensor([[10.0, 20.0]])
    y = lora_linear_(out, torch.tensor([[1.0, 2.0]]), A=torch.tensor([[1.0, 1.0]]), B=torch.tensor([[2.0], [-1.0]]),
                     bias=torch.tensor([1.0, 0.0]), scaling=0.5, dropout=0.0)
    assert torch.equal(y, torch.tensor([[13.5, 18.5]]))


@pytest.mark.parametrize("p", [0.0, 0.4], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gradcheck_float64(p, bias):
    t = tensors((2, 3), dtype=torch.float64, bias=bias)
    inputs = tuple(v for v in (t["out0"], t["x"], t["A"], t["B"], t["b"]) if v is not None)

    def f(out0, x, A, B, b=None):
        return _LoraLinear.apply(out0.clone(), x, A, B, b, S, p, 1234)   # clone: the op writes into out

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ---- dropout ------------------------------------------------------------------------------------


def _x_variants():
    g = torch.Generator().manual_seed(3)
    return {
        "x2d": torch.randn(6, D_IN, generator=g),
        "x3d": torch.randn(2, 3, D_IN, generator=g),
        "x2d_transposed": torch.randn(D_IN, 6, generator=g).t(),            # dense, column-major
        "x3d_sliced": torch.randn(2, 3, 2 * D_IN, generator=g)[..., :D_IN],  # not dense
    }


@pytest.mark.parametrize("which", list(_x_variants()))
def test_backward_uses_the_forward_mask(which):
    p, seed = 0.5, 77
    x = _x_variants()[which].requires_grad_()
    t = tensors(x.shape[:-1])
    t["x"] = x
    mask = mask_for(x, p, seed)
    assert 0 < (mask == 0).float().mean() < 1
    y = fused(**t, p=p, seed=seed)
    ref = plain(**t, mask=mask)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)        # the forward used this mask
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    names = ["out", "x", "A", "B", "b"]
    for name, got, want in zip(names, grads(y, t, g), grads(ref, t, g), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keeps_one_minus_p_and_rescales_survivors(p):
    # With A = B = I and s = 1, the LoRA term is dropout(x) itself; x = ones shows the mask.
    n = 60_000
    eye = torch.eye(4)
    x = torch.ones(n // 4, 4)
    torch.manual_seed(0)
    y = lora_linear_(torch.zeros(n // 4, 4), x, A=eye, B=eye, bias=None, scaling=1.0, dropout=p)
    kept = y != 0
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01      # SE <= 0.002 over 60k draws
    assert abs(y.mean().item() - 1.0) < 0.03                     # inverted dropout is unbiased


def test_mask_helper_is_a_function_of_the_seed():
    shape = torch.Size((50, 40))
    a, b, c = (_keep(shape, torch.device("cpu"), 0.3, seed).float() / 0.7 for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().tolist() == pytest.approx([0.0, 1 / 0.7])


def test_seed_comes_from_the_global_generator():
    t = tensors((8,))
    with torch.no_grad():
        torch.manual_seed(0)
        y1 = fused(**t, p=0.5)
        torch.manual_seed(0)
        y2 = fused(**t, p=0.5)
        y3 = fused(**t, p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


# ---- memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_saves_only_x_and_the_rank_r_activation(p):
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(D_OUT, D_IN, generator=g), requires_grad=False)
    A = torch.nn.Parameter(torch.randn(R, D_IN, generator=g))
    B = torch.nn.Parameter(torch.randn(D_OUT, R, generator=g))
    bias = torch.nn.Parameter(torch.randn(D_OUT, generator=g))
    x = torch.randn(4, 6, D_IN, generator=g, requires_grad=True)
    param_storages = {q.untyped_storage().data_ptr() for q in (W, A, B, bias)}
    x_storage = x.untyped_storage().data_ptr()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.linear(x, W)                       # the frozen base
        y = lora_linear_(out, x, A=A, B=B, bias=bias, scaling=S, dropout=p)
    others = [t for t in saved if t.untyped_storage().data_ptr() not in param_storages]
    shared_x = [t for t in others if t.untyped_storage().data_ptr() == x_storage]
    rest = [tuple(t.shape) for t in others if t.untyped_storage().data_ptr() != x_storage]
    assert shared_x, "x itself is saved"
    bits = [(-(-24 * D_IN // 8),)] if p > 0 else []      # the dropout mask, one bit per entry of x
    assert rest == [(24, R), *bits], f"only h (N, r) and the mask's bits may be saved besides x, got {rest}"
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None and bias.grad is not None


# ---- mixed precision ------------------------------------------------------------------------------


def test_bf16_output_with_fp32_adapter():
    t = tensors((2, 8))
    out_bf = t["out0"].detach().bfloat16().requires_grad_()
    x_bf = t["x"].detach().bfloat16().requires_grad_()
    A, B, b = t["A"], t["B"], t["b"]
    y = lora_linear_(out_bf * 1, x_bf, A=A, B=B, bias=b, scaling=S, dropout=0.0)
    assert y.dtype == torch.bfloat16
    # fp32 reference on the same (bf16-rounded) inputs
    ref = plain(out_bf.detach().float(), x_bf.detach().float(), A, B, b)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gA, gB, gb, gx = torch.autograd.grad((y.float() * gy).sum(), (A, B, b, x_bf))
    assert gA.dtype == gB.dtype == gb.dtype == torch.float32 and gx.dtype == torch.bfloat16
    rA, rB, rb = torch.autograd.grad((ref * gy).sum(), (A, B, b))
    for got, want in ((gA, rA), (gB, rB), (gb, rb)):
        assert (got - want).norm() / want.norm() < 0.02


# ---- activation checkpointing ----------------------------------------------------------------------


def test_checkpointing_with_dropout_gives_the_same_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0", "2"],
                                        init_lora_weights=False))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    x0 = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))

    def run(seed, use_checkpoint):
        x = x0.clone().requires_grad_()
        torch.manual_seed(seed)
        y = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        return [y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, *params])]

    plain_run, ckpt_run, other_seed = run(5, False), run(5, True), run(6, False)
    assert len(params) == 4
    for a, b in zip(plain_run, ckpt_run, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(plain_run[0], other_seed[0])     # dropout is live, so the seed matters
