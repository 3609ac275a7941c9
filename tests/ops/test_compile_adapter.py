"""`torch.compile(fullgraph=True)` on a LoRA-adapted `nn.Linear`: no graph break, and the eager
layer's results.

Without dropout the compiled layer must give the eager layer's output and gradients. With dropout
its mask comes from another random stream than the eager seed (lorakit.ops.lora_linear), so the
check is structural: with r = d_in = d_out and invertible factors the adapter term determines
dropout(x) uniquely, so the mask the compiled forward used is read back from its output; every
entry must be 0 or 1/(1-p), about 1-p of them kept, and the output and every gradient must be
the closed form with that mask (which fails if backward used another mask than forward).

Most tests use the `aot_eager` backend: it runs dynamo's graph capture and AOTAutograd, where
graph breaks and autograd.Function problems show, in about a second; the inductor ones are slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit as lk

P = 0.3


def adapted(d_in: int, d_out: int, r: int, dropout: float, dora: bool, dtype=torch.float32) -> nn.Module:
    """An nn.Linear with a bias and one LoRA (or DoRA) adapter with random A and B, in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, dtype=dtype))
    lk.add_adapter(model, lk.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"],
                                        init_lora_weights=False, use_dora=dora, lora_bias=not dora))
    with torch.no_grad():
        if dora:   # move the magnitude away from ||W + sBA|| so that the DoRA factor is not 1
            model[0].lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, d_out, dtype=dtype))
    return model[0].train()


def trained(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def forward_backward(fn, layer, x, g):
    x = x.detach().requires_grad_()
    y = fn(x)
    grads = torch.autograd.grad((y * g).sum(), [x, *trained(layer)])
    return y.detach(), grads


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fullgraph_without_dropout_equals_eager(dora):
    torch._dynamo.reset()
    layer = adapted(16, 24, 4, 0.0, dora)
    x = torch.randn(2, 5, 16)
    g = torch.randn(2, 5, 24)
    want_y, want_g = forward_backward(layer, layer, x, g)
    got_y, got_g = forward_backward(torch.compile(layer, fullgraph=True, backend="aot_eager"), layer, x, g)
    torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- dropout: read the mask back from the output -----------------------------------------------


def closed_form(layer: nn.Module, x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """y for the dropout multiplier `mult` (0 or 1/(1-p) per entry of x), from the definitions:
    LoRA  y = W x + b + s (B A (x * mult) + b_B);
    DoRA  y = b + (f - 1) W (x * mult) + W x + f s B A (x * mult),  f = m / ||W + s B A||_row detached."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    xd = x * mult
    if not layer.use_dora["default"]:
        return F.linear(x, W, b) + s * (xd @ A.t() @ B.t() + layer.lora_B["default"].bias)
    f = layer.lora_magnitude_vector["default"] / torch.linalg.norm(W + s * B @ A, dim=1).detach()
    return b + (f - 1) * F.linear(xd, W) + F.linear(x, W) + f * s * (xd @ A.t() @ B.t())


def read_mask(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The multiplier whose closed form gives y: the adapter's part of y is M (x * mult) + c with M
    square and invertible, so x * mult = M^-1 (y - c), then divide by x."""
    with torch.no_grad():
        W, b = layer.base_layer.weight, layer.base_layer.bias
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        if layer.use_dora["default"]:
            f = layer.lora_magnitude_vector["default"] / torch.linalg.norm(W + s * B @ A, dim=1)
            M, c = (f - 1)[:, None] * W + f[:, None] * s * (B @ A), F.linear(x, W, b)
        else:
            M, c = s * (B @ A), F.linear(x, W, b) + s * layer.lora_B["default"].bias
        xd = torch.linalg.solve(M, (y - c).reshape(-1, M.shape[0]).t()).t().reshape(x.shape)
        return xd / x


@pytest.mark.parametrize("dora, recompute", [(False, False), (False, True), (True, False)],
                         ids=["lora", "lora_checkpointed", "dora"])
def test_fullgraph_with_dropout_draws_one_valid_mask_for_forward_and_backward(dora, recompute):
    torch._dynamo.reset()
    d = 4
    layer = adapted(d, d, d, P, dora, torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    call = (lambda x: checkpoint(compiled, x, use_reentrant=False)) if recompute else compiled
    x = torch.randn(500, 4, d, dtype=torch.float64)                 # 8000 dropout draws
    g = torch.randn(500, 4, d, dtype=torch.float64)

    torch.manual_seed(1)
    y, grads = forward_backward(call, layer, x, g)
    mult = read_mask(layer, x, y)
    kept = mult > 0.5 / (1 - P)
    torch.testing.assert_close(mult, kept.double() / (1 - P), rtol=0, atol=1e-8)   # every entry 0 or 1/(1-p)
    assert abs(kept.double().mean().item() - (1 - P)) < 0.03                       # SE 0.005
    want_y, want_g = forward_backward(lambda x: closed_form(layer, x, kept.double() / (1 - P)), layer, x, g)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, want_g, strict=True):                          # backward used the same mask
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    torch.manual_seed(1)
    again, _ = forward_backward(call, layer, x, g)
    other, _ = forward_backward(call, layer, x, g)
    assert torch.equal(again, y)                                    # seeded: reproducible
    assert not torch.equal(read_mask(layer, x, other) > 0.5 / (1 - P), kept)   # a fresh mask per call


def test_eval_mode_has_no_dropout_when_compiled():
    torch._dynamo.reset()
    layer = adapted(16, 24, 4, P, False).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


@pytest.mark.slow   # inductor generates and builds C++ for forward and backward: 10-20 s each, cold cache, 2 cores
@pytest.mark.parametrize("dropout", [0.0, P], ids=["no_dropout", "dropout"])
def test_inductor(dropout):
    torch._dynamo.reset()
    d = 4
    layer = adapted(d, d, d, dropout, False, torch.float64)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(200, d, dtype=torch.float64)
    g = torch.randn(200, d, dtype=torch.float64)
    y, grads = forward_backward(compiled, layer, x, g)
    if dropout:
        kept = read_mask(layer, x, y) > 0.5 / (1 - P)
        assert 0.6 < kept.double().mean().item() < 0.8                 # 800 draws, SE 0.016
        mult = kept.double() / (1 - P)
    else:
        mult = torch.ones_like(x)
    want_y, want_g = forward_backward(lambda x: closed_form(layer, x, mult), layer, x, g)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, want_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
