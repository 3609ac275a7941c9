"""The adapter math of `lorakit.layers`, checked against closed forms on tiny hand-set layers.

Every layer is reached the public way: `lk.add_adapter` on a one-module container, then the
wrapper is the container's submodule. Small cases use integer-valued weights, so the float32
results are exact and the expected values are written out by hand.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear

T = torch.tensor

# The hand case used throughout: W (2 x 3), b (2,), A (r=2 x 3), B (2 x r=2), alpha 4 -> s = 2.
#   B A   = [[1, 2, -1], [0, -1, 0]]
#   W + sBA = [[3, 6, 1], [4, 3, 6]]
W0 = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
b0 = T([1.0, -1.0])
A0 = T([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
B0 = T([[1.0, 2.0], [0.0, -1.0]])
W_MERGED = T([[3.0, 6.0, 1.0], [4.0, 3.0, 6.0]])
X0 = T([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
# x W'^T + b: row 1 -> [10, 13] + b, row 2 -> [5, 2] + b
Y0 = T([[11.0, 12.0], [6.0, 1.0]])
Y0_BASE = T([[7.0, 14.0], [0.0, 1.0]])  # x W^T + b


def wrap(module: nn.Module, name: str = "default", model: nn.Module | None = None, **cfg) -> tuple[nn.Module, nn.Module]:
    """Put `module` in a Sequential, add an adapter to it, return (model, wrapper)."""
    model = nn.Sequential(module) if model is None else model
    lk.add_adapter(model, lk.LoraConfig(target_modules=["0"], **cfg), name=name)
    return model, model[0]


def hand_linear(kind: str = "linear", bias: bool = True) -> nn.Module:
    """The hand case's base layer as nn.Linear or as GPT-2's Conv1D (weight stored as W^T)."""
    with torch.no_grad():
        if kind == "linear":
            m = nn.Linear(3, 2, bias=bias)
            m.weight.copy_(W0)
        else:
            m = Conv1D(2, 3)  # nf=d_out, nx=d_in; weight (d_in, d_out)
            m.weight.copy_(W0.t())
            if not bias:
                m.bias = None
        if bias:
            m.bias.copy_(b0)
    return m


def set_lora(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, name: str = "default", b: torch.Tensor | None = None):
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(A)
        layer.lora_B[name].weight.copy_(B)
        if b is not None:
            layer.lora_B[name].bias.copy_(b)


def weight_oi(layer: LoraLinear) -> torch.Tensor:
    w = layer.base_layer.weight.detach()
    return w.t() if layer.fan_in_fan_out else w


def randomise(layer: nn.Module, seed: int = 0, std: float = 0.5, name: str = "default") -> None:
    """Give every parameter of adapter `name` random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


LINEAR_KINDS = pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])


# ---- init --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(5, 4), torch.randn(3, 5)),
    (lambda: Conv1D(4, 5), torch.randn(2, 3, 5)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)),
    (lambda: nn.Conv1d(3, 4, 3), torch.randn(2, 3, 7)),
], ids=["linear", "conv1d_gpt2", "conv2d", "conv1d"])
def test_default_init_reproduces_the_base_exactly(make, x):
    torch.manual_seed(0)
    base = make()
    expected = base(x)
    model, layer = wrap(base, r=2, lora_alpha=16)
    assert isinstance(layer, (LoraLinear, LoraConv))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    assert torch.equal(model(x), expected)


def test_embedding_init_is_a_zero_and_b_standard_normal():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 512)
    ids = T([[0, 3, 9], [4, 4, 1]])
    expected = emb(ids)
    model, layer = wrap(emb, r=16)
    assert isinstance(layer, LoraEmbedding)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (16, 10) and B.shape == (512, 16)
    assert torch.count_nonzero(A) == 0
    assert abs(B.mean().item()) < 0.05 and abs(B.std().item() - 1.0) < 0.05   # 8192 samples of N(0, 1)
    assert torch.equal(model(ids), expected)


def test_kaiming_init_of_a_has_bound_one_over_sqrt_d_in():
    torch.manual_seed(0)
    d_in, r = 1024, 64
    _, layer = wrap(nn.Linear(d_in, 8), r=r)
    A = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(d_in)
    assert A.abs().max().item() <= bound
    assert A.abs().max().item() > 0.99 * bound     # 65536 uniform draws reach the edge
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound   # U(-b, b) has std b / sqrt(3)


def test_gaussian_init_of_a_has_std_one_over_r():
    torch.manual_seed(0)
    r = 4
    _, layer = wrap(nn.Linear(2000, 8), r=r, init_lora_weights="gaussian")
    A = layer.lora_A["default"].weight
    assert abs(A.std().item() - 1 / r) < 0.05 / r
    assert abs(A.mean().item()) < 0.05 / r
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(5, 4), torch.randn(3, 5)),
    (lambda: Conv1D(4, 5), torch.randn(3, 5)),
    (lambda: nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5)),
    (lambda: nn.Embedding(6, 4), T([[0, 5, 2]])),
], ids=["linear", "conv1d_gpt2", "conv2d", "embedding"])
def test_init_false_leaves_the_update_nonzero(make, x):
    torch.manual_seed(0)
    base = make()
    expected = base(x)
    model, layer = wrap(base, r=2, init_lora_weights=False)
    params = layer.adapter_parameters("default")
    assert all(torch.count_nonzero(p) > 0 for p in params.values())
    assert not torch.allclose(model(x), expected)


# ---- forward: closed form ------------------------------------------------------------------------


@LINEAR_KINDS
def test_linear_forward_closed_form(kind):
    model, layer = wrap(hand_linear(kind), r=2, lora_alpha=4)
    assert layer.scaling["default"] == 2.0
    assert layer.fan_in_fan_out is (kind == "conv1d_gpt2")
    set_lora(layer, A0, B0)
    model.eval()
    assert torch.equal(model(X0), Y0)
    assert torch.equal(model(X0[None]), Y0[None])   # leading batch dims


@LINEAR_KINDS
def test_rslora_scaling_is_alpha_over_sqrt_r(kind):
    # r = 4, alpha = 4: plain scaling 1, rsLoRA scaling 2. A, B padded with zero rank components.
    A = torch.cat([A0, torch.zeros(2, 3)])
    B = torch.cat([B0, torch.zeros(2, 2)], dim=1)
    plain, lp = wrap(hand_linear(kind), r=4, lora_alpha=4)
    rs, lr = wrap(hand_linear(kind), r=4, lora_alpha=4, use_rslora=True)
    assert lp.scaling["default"] == 1.0 and lr.scaling["default"] == 2.0
    set_lora(lp, A, B)
    set_lora(lr, A, B)
    # s = 1: W + BA = [[2, 4, 2], [4, 4, 6]]
    assert torch.equal(plain.eval()(X0), T([[9.0, 13.0], [3.0, 1.0]]))
    assert torch.equal(rs.eval()(X0), Y0)


def test_embedding_forward_closed_form():
    emb = nn.Embedding(4, 2)
    with torch.no_grad():
        emb.weight.copy_(T([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]))
    model, layer = wrap(emb, r=2, lora_alpha=4)   # s = 2
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(T([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))  # (r, num)
        layer.lora_embedding_B["default"].copy_(T([[1.0, 0.0], [1.0, 1.0]]))                      # (dim, r)
    # (B A)^T = [[1, 1], [0, 1], [2, 2], [0, -1]];  W + 2 (BA)^T = [[2, 3], [2, 5], [8, 9], [6, 5]]
    ids = T([[0, 3], [2, 2]])
    assert torch.equal(model(ids), T([[[2.0, 3.0], [6.0, 5.0]], [[8.0, 9.0], [8.0, 9.0]]]))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)],
                         ids=["pad1", "stride2", "dilation2"])
def test_conv2d_forward_is_base_plus_scaled_1x1_b_of_conv_a(stride, padding, dilation):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
    model, layer = wrap(base, r=2, lora_alpha=6)   # s = 3
    randomise(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (2, 3, 3, 3) and B.shape == (4, 2, 1, 1)
    x = torch.randn(2, 3, 7, 7)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    expected = F.conv2d(x, base.weight, base.bias, **kw) + 3 * F.conv2d(F.conv2d(x, A, **kw), B)
    torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=0)


# ---- dropout --------------------------------------------------------------------------------------


@LINEAR_KINDS
def test_dropout_never_touches_the_base_path(kind):
    model, layer = wrap(hand_linear(kind), r=2, lora_alpha=4, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A0)       # B stays 0: the adapter term is 0 whatever the mask
    model.train()
    torch.manual_seed(0)
    assert torch.equal(model(X0), Y0_BASE)
    assert torch.equal(model(X0[:1].expand(64, 3)), Y0_BASE[:1].expand(64, 2))


@LINEAR_KINDS
def test_eval_mode_has_no_dropout(kind):
    model, layer = wrap(hand_linear(kind), r=2, lora_alpha=4, lora_dropout=0.5)
    set_lora(layer, A0, B0)
    model.eval()
    assert torch.equal(model(X0), Y0)
    assert torch.equal(model(X0), Y0)


def test_train_mode_dropout_is_reproducible_with_a_seed():
    model, layer = wrap(hand_linear(), r=2, lora_alpha=4, lora_dropout=0.5)
    set_lora(layer, A0, B0)
    model.train()
    x = X0.repeat(16, 1)
    torch.manual_seed(0)
    y1 = model(x)
    torch.manual_seed(0)
    y2 = model(x)
    torch.manual_seed(1)
    y3 = model(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y1, Y0.repeat(16, 1))   # dropout is on in train mode


def test_train_mode_dropout_is_unbiased():
    p, n = 0.3, 40_000
    model, layer = wrap(hand_linear(), r=2, lora_alpha=4, lora_dropout=p)
    set_lora(layer, A0, B0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        y = model(X0[:1].expand(n, 3))        # n independent masks of the same input row
    # each row's adapter term is s B A (x * mask / (1 - p)); its mean is the no-dropout term
    assert y.std(0).min() > 1.0               # the masks do vary the output
    err = (y.mean(0) - Y0[0]).abs()
    assert (err < 5 * y.std(0) / math.sqrt(n)).all(), err
    # the survivors are scaled: the support of each output is the 2^3 sums of masked columns
    dW = 2 * (B0 @ A0)                         # (2, 3)
    masks = torch.tensor([[i >> k & 1 for k in range(3)] for i in range(8)], dtype=torch.float32)
    support = b0 + X0[0] @ W0.t() + (masks * X0[0] / (1 - p)) @ dW.t()   # (8, 2)
    dist = (y[:200, None, :] - support[None]).abs().amax(-1).amin(-1)
    assert dist.max() < 1e-5


# ---- merge ------------------------------------------------------------------------------------------


@LINEAR_KINDS
def test_merge_hand_case(kind):
    model, layer = wrap(hand_linear(kind), r=2, lora_alpha=4)
    set_lora(layer, A0, B0)
    model.eval()
    lk.merge_adapters(model)
    expected_w = W_MERGED.t() if kind == "conv1d_gpt2" else W_MERGED
    assert torch.equal(layer.base_layer.weight, expected_w)
    assert torch.equal(layer.base_layer.bias, b0)
    assert torch.equal(model(X0), Y0)            # the term is not added a second time
    lk.merge_adapters(model)                     # idempotent
    assert torch.equal(layer.base_layer.weight, expected_w)
    lk.unmerge_adapters(model)
    assert torch.equal(layer.base_layer.weight, W0.t() if kind == "conv1d_gpt2" else W0)
    assert torch.equal(model(X0), Y0)


@LINEAR_KINDS
def test_merge_with_lora_bias_adds_scaled_b_bias(kind):
    model, layer = wrap(hand_linear(kind), r=2, lora_alpha=4, lora_bias=True)
    set_lora(layer, A0, B0, b=T([1.0, 2.0]))
    model.eval()
    y = model(X0)
    assert torch.equal(y, Y0 + T([2.0, 4.0]))    # s * b_B
    lk.merge_adapters(model)
    assert torch.equal(layer.base_layer.bias, T([3.0, 3.0]))
    assert torch.equal(model(X0), y)
    lk.unmerge_adapters(model)
    assert torch.equal(layer.base_layer.bias, b0)


def _random_case(kind: str):
    """(base module, input) for the random merge checks."""
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(2, 3, 6)
    if kind == "conv1d_gpt2":
        return Conv1D(5, 6), torch.randn(2, 3, 6)
    if kind == "conv1d":
        return nn.Conv1d(3, 4, 3, padding=1), torch.randn(2, 3, 9)
    if kind == "conv2d_3x3":
        return nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), torch.randn(2, 3, 9, 9)
    return nn.Embedding(7, 5), T([[0, 6, 3], [3, 1, 1]])


MERGE_KINDS = ["linear", "conv1d_gpt2", "conv1d", "conv2d_3x3", "embedding"]


@pytest.mark.parametrize("kind", MERGE_KINDS)
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    torch.manual_seed(0)
    base, x = _random_case(kind)
    w = base.weight.detach().clone()
    model, layer = wrap(base, r=3, lora_alpha=5, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        y = model(x)
        delta = layer.delta_weight("default")
        lk.merge_adapters(model)
        merged_w = layer.base_layer.weight.clone()
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
        lk.merge_adapters(model)                                    # idempotent
        assert torch.equal(layer.base_layer.weight, merged_w)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
        lk.unmerge_adapters(model)
    torch.testing.assert_close(merged_w, w + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MERGE_KINDS)
def test_delta_weight_closed_form(kind):
    """s B A in the base weight's layout, computed here from the raw factors."""
    torch.manual_seed(0)
    base, _ = _random_case(kind)
    _, layer = wrap(base, r=3, lora_alpha=6, init_lora_weights=False)   # s = 2
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        expected = 2 * (B @ A).t()                                       # (num, dim)
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if kind.startswith("conv") and kind != "conv1d_gpt2":
            Bm = B.flatten(1)                                           # (c_out, r)
            expected = 2 * (Bm @ A.flatten(1)).view(base.weight.shape)
        else:
            expected = 2 * (B @ A)
            if kind == "conv1d_gpt2":
                expected = expected.t()
    torch.testing.assert_close(layer.delta_weight("default"), expected.detach(), atol=1e-6, rtol=0)
    assert layer.delta_weight("default").shape == base.weight.shape


def test_embedding_merge_hand_case():
    emb = nn.Embedding(4, 2)
    with torch.no_grad():
        emb.weight.copy_(T([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]))
    model, layer = wrap(emb, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(T([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        layer.lora_embedding_B["default"].copy_(T([[1.0, 0.0], [1.0, 1.0]]))
    lk.merge_adapters(model)
    assert torch.equal(layer.base_layer.weight, T([[2.0, 3.0], [2.0, 5.0], [8.0, 9.0], [6.0, 5.0]]))
    assert torch.equal(model(T([3, 0])), T([[6.0, 5.0], [2.0, 3.0]]))


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect", "replicate"])
def test_conv_adapter_pads_like_the_base(padding_mode):
    """conv_A sees the same padded input as the base conv, so merging (which folds s B A into the
    base kernel) does not change the output whatever the padding mode."""
    torch.manual_seed(0)
    base = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(1, 2, 5, 5)
    model, layer = wrap(base, r=2, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        y = model(x)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        xp = F.pad(x, (1, 1, 1, 1), mode=padding_mode) if padding_mode != "zeros" else F.pad(x, (1, 1, 1, 1))
        expected = F.conv2d(xp, base.weight, base.bias) + layer.scaling["default"] * F.conv2d(F.conv2d(xp, A), B)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
        lk.merge_adapters(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)


# ---- DoRA ---------------------------------------------------------------------------------------------


def _dora_case(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    model, layer = wrap(base, r=2, lora_alpha=4, use_dora=True)
    return model, layer, torch.randn(3, 6)


def _dora_closed_form(layer: LoraLinear, x: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """m * (W + s B A) / ||W + s B A||_row applied to x, plus the bias (n detached if asked)."""
    W = weight_oi(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    V = W + layer.scaling["default"] * (B @ A)
    n = V.norm(dim=1)
    if detach_norm:
        n = n.detach()
    return x @ ((m / n)[:, None] * V).t() + layer.base_layer.bias


@LINEAR_KINDS
def test_dora_init_is_the_base_and_magnitude_is_row_norms(kind):
    model, layer, x = _dora_case(kind)
    with torch.no_grad():
        expected = layer.base_layer(x)
    m = layer.lora_magnitude_vector["default"]
    assert m.shape == (4,) and m.requires_grad
    W = weight_oi(layer)
    torch.testing.assert_close(m.detach(), W.pow(2).sum(1).sqrt(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.eval()(x), expected, atol=1e-6, rtol=0)


@LINEAR_KINDS
def test_dora_forward_closed_form(kind):
    model, layer, x = _dora_case(kind)
    randomise(layer, seed=1)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].add_(1.0)
    model.eval()
    torch.testing.assert_close(model(x), _dora_closed_form(layer, x), atol=1e-5, rtol=0)


@LINEAR_KINDS
def test_dora_merged_equals_unmerged(kind):
    model, layer, x = _dora_case(kind)
    randomise(layer, seed=1)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].add_(1.0)
    model.eval()
    w = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        lk.merge_adapters(model)
        W_merged = weight_oi(layer).clone()
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
        lk.unmerge_adapters(model)
    # merged weight: rows of W + s B A rescaled to norm m
    torch.testing.assert_close(W_merged.norm(dim=1), layer.lora_magnitude_vector["default"].detach(),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)


@LINEAR_KINDS
def test_dora_norm_is_detached_in_the_gradient(kind):
    model, layer, x = _dora_case(kind)
    randomise(layer, seed=1)
    model.eval()
    params = [layer.lora_magnitude_vector["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((model(x) * g).sum(), params)
    detached = torch.autograd.grad((_dora_closed_form(layer, x, detach_norm=True) * g).sum(), params)
    through = torch.autograd.grad((_dora_closed_form(layer, x, detach_norm=False) * g).sum(), params)
    for got, want in zip(grads, detached, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the test tells the two apart: differentiating through the norm gives other grads for B
    assert not torch.allclose(detached[2], through[2], atol=1e-4)


# ---- PiSSA / OLoRA --------------------------------------------------------------------------------


def _svd_case(kind: str, gap: bool = False):
    """A 6 x 5 weight (Linear or Conv1D); with `gap`, singular values 10, 8 then < 0.1."""
    g = torch.Generator().manual_seed(0)
    if gap:
        U, _ = torch.linalg.qr(torch.randn(6, 5, generator=g))
        V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
        W = U @ torch.diag(T([10.0, 8.0, 0.08, 0.05, 0.01])) @ V.t()
    else:
        W = torch.randn(6, 5, generator=g)
    base = nn.Linear(5, 6) if kind == "linear" else Conv1D(6, 5)
    with torch.no_grad():
        base.weight.copy_(W if kind == "linear" else W.t())
        base.bias.copy_(torch.randn(6, generator=g))
    return base, W, torch.randn(4, 5, generator=g)


@LINEAR_KINDS
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_the_output_and_takes_the_top_singular_subspace(kind, init):
    base, W, x = _svd_case(kind, gap=init != "pissa")
    with torch.no_grad():
        y = base(x)
    model, layer = wrap(base, r=2, lora_alpha=4, init_lora_weights=init)   # s = 2
    model.eval()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    U, S, Vh = torch.linalg.svd(W)
    top = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]                          # rank-2 truncated SVD
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    tol = 1e-5 if init == "pissa" else 1e-3                               # randomised SVD: approximate
    torch.testing.assert_close(2 * B @ A, top, atol=tol, rtol=0)
    torch.testing.assert_close(weight_oi(layer), W - top, atol=tol, rtol=0)   # residual base
    torch.testing.assert_close(weight_oi(layer) + 2 * B @ A, W, atol=1e-5, rtol=0)
    # sigma split evenly between the factors: B^T B = A A^T = diag(S_r / s)
    torch.testing.assert_close(B.t() @ B, torch.diag(S[:2] / 2), atol=tol * 10, rtol=0)
    torch.testing.assert_close(A @ A.t(), torch.diag(S[:2] / 2), atol=tol * 10, rtol=0)


@LINEAR_KINDS
def test_olora_keeps_the_output_and_b_is_orthonormal(kind):
    base, W, x = _svd_case(kind)
    with torch.no_grad():
        y = base(x)
    model, layer = wrap(base, r=3, lora_alpha=6, init_lora_weights="olora")   # s = 2
    model.eval()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(B.t() @ B, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(2 * B @ A, 2 * Q[:, :3] @ R[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(A, torch.triu(A), atol=0, rtol=0)           # R_r is upper triangular
    torch.testing.assert_close(weight_oi(layer) + 2 * B @ A, W, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_svd_inits_are_refused_on_embeddings(init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4))
    w = model[0].weight.detach().clone()
    with pytest.raises(lk.ConfigError, match=re.escape(f"init_lora_weights={init!r} is for Linear layers; 0 is a "
                                                      "Embedding: exclude it or use True / 'gaussian'")):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0"], init_lora_weights=init))
    assert type(model[0]) is nn.Embedding and not hasattr(model, "_lorakit")
    assert torch.equal(model[0].weight, w) and model[0].weight.requires_grad


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_refused_svd_init_leaves_other_layers_untouched(init):
    """A Linear initialised before the refused Embedding must get its original weight back."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "emb": nn.Embedding(5, 4)})
    w = model["proj"].weight.detach().clone()
    with pytest.raises(lk.ConfigError):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["proj", "emb"], init_lora_weights=init))
    assert type(model["proj"]) is nn.Linear and not hasattr(model, "_lorakit")
    assert torch.equal(model["proj"].weight, w)


# ---- several adapters ------------------------------------------------------------------------------


@LINEAR_KINDS
def test_active_adapters_add_their_terms(kind):
    model, la = wrap(hand_linear(kind), name="a", r=2, lora_alpha=4)             # s = 2
    _, lb = wrap(None, name="b", model=model, r=1, lora_alpha=3)                   # s = 3
    assert la is lb
    set_lora(la, A0, B0, name="a")
    set_lora(la, T([[0.0, 0.0, 1.0]]), T([[1.0], [2.0]]), name="b")               # 3 B A x = 3 x_3 [1, 2]
    model.eval()
    term_b = 3 * X0[:, 2:3] * T([[1.0, 2.0]])                                      # [[3, 6], [-3, -6]]
    assert lk.active_adapters(model) == ["b"]                                      # the last added is active
    assert torch.equal(model(X0), Y0_BASE + term_b)
    lk.set_active_adapters(model, ["a", "b"])
    assert torch.equal(model(X0), Y0 + term_b)
    lk.set_active_adapters(model, "a")
    assert torch.equal(model(X0), Y0)
    lk.set_active_adapters(model, [])
    assert torch.equal(model(X0), Y0_BASE)
    lk.set_active_adapters(model, ["a", "b"])
    lk.merge_adapters(model)
    assert torch.equal(model(X0), Y0 + term_b)
