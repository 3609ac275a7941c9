"""AdapterFusion for LoRA: in each adapted layer, attention over the outputs of N frozen adapters.

AdapterFusion (Pfeiffer et al., 2021) learns, per layer, which of several task adapters to listen
to, token by token. Here, for a layer with input x and adapter outputs o_i = s_i B_i A_i dropout(x)
(+ s_i b_i), i = 1..N:

    q     = Q x                                   Q (d_k, d_in): the query, from the layer input
    k_i   = K o_i                                 K (d_k, d_out): a key per adapter output
    a     = softmax_i(q . k_i / (temperature * sqrt(d_k)))        (N,)
    y     = base(x) + V(sum_i a_i o_i)

Q and K start small and random (N(0, 0.02^2), so the attention starts nearly uniform) and V at the
identity: at initialisation the layer adds the mean of its adapters' outputs. V is linear, so
sum_i a_i V(o_i) = V(sum_i a_i o_i) and V runs once per token. Unlike the paper, the scores are
scaled by 1/sqrt(d_k), so one temperature means the same whatever `key_dim`.

Sizes: AdapterFusion's Q, K, V are hidden x hidden per transformer layer. Here fusion sits in every
adapted linear layer, so full-size projections would cost about 3 d^2 parameters per layer (for
an 8B model with all-linear experts, more parameters than the model). So d_k = `key_dim` (default
64), and V = I + V_B V_A is the identity plus a rank-`value_rank` correction (V_A random, V_B
zero, like a LoRA adapter: exactly the identity at initialisation); `value_rank: null` gives the
paper's full d_out x d_out V, initialised at the identity.

Nothing of size N x d_out is formed: with h = dropout(x) A_cat^T (N_tok, R), the scores are
((q K Bs_cat) * h) summed over each adapter's columns, and the mixed output is
(h * a[col_expert]) Bs_cat^T, as in the mixture of experts (`mixture.py`). Only the fusion
parameters train; the adapters stay frozen. Saved and loaded with `save_mixture` / `load_mixture`
(kind "fusion").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraError
from ..layers import LoraLinear
from .mixture import ExpertComposer, attach
from .settings import FusionConfig

QK_INIT_STD = 0.02


class AdapterFusion(ExpertComposer):
    """The fusion layer of one adapted layer (see the module docstring)."""

    kind = "fusion"

    def __init__(self, layer: LoraLinear, adapters: list[str], config: FusionConfig) -> None:
        super().__init__(layer, adapters, config)
        kw = {"device": self.col_expert.device, "dtype": self.param_dtype(layer)}
        d_in, d_out, d_k = layer.in_features, layer.out_features, config.key_dim
        self.query = nn.Linear(d_in, d_k, bias=False, **kw)                     # (d_k, d_in)
        self.key = nn.Linear(d_out, d_k, bias=False, **kw)                      # (d_k, d_out)
        nn.init.normal_(self.query.weight, std=QK_INIT_STD)
        nn.init.normal_(self.key.weight, std=QK_INIT_STD)
        if config.value_rank is None:
            self.value = nn.Linear(d_out, d_out, bias=False, **kw)              # (d_out, d_out)
            with torch.no_grad():
                self.value.weight.copy_(torch.eye(d_out))
        else:
            self.value_A = nn.Linear(d_out, config.value_rank, bias=False, **kw)   # (r_v, d_out)
            self.value_B = nn.Linear(config.value_rank, d_out, bias=False, **kw)   # (d_out, r_v)
            nn.init.kaiming_uniform_(self.value_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.value_B.weight)
        member = F.one_hot(self.col_expert, self.n_experts).float()             # (R, N): column -> adapter
        self.register_buffer("member", member, persistent=False)
        self.last_attention: Tensor | None = None

    def attention(self, x2: Tensor, h: Tensor, Bs: Tensor, bias: Tensor | None) -> Tensor:
        """(N_tok, N) attention weights, in fp32, from the layer input and the adapters' hidden h."""
        q = F.linear(x2, self.query.weight.to(x2.dtype)).float()                # (N_tok, d_k)
        K = self.key.weight.float()
        u = q @ (K @ Bs.float())                                                # (N_tok, R): q^T K s_i B_i per column
        scores = (u * h.float()) @ self.member                                  # (N_tok, N): q . K o_i
        if bias is not None:
            scores = scores + q @ (K @ bias.float().t())                        # q . K s_i b_i
        return torch.softmax(scores / (self.config.temperature * math.sqrt(self.config.key_dim)), dim=-1)

    def value_of(self, mixed: Tensor) -> Tensor:
        dtype = mixed.dtype
        if self.config.value_rank is None:
            return F.linear(mixed, self.value.weight.to(dtype))
        return mixed + F.linear(F.linear(mixed, self.value_A.weight.to(dtype)), self.value_B.weight.to(dtype))

    def forward(self, layer: LoraLinear, x: Tensor, base_out: Tensor) -> Tensor:
        self._check(layer)
        dtype = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1])                                         # (N_tok, d_in)
        A, Bs, bias = self.factors(layer)
        h = self.hidden(layer, x2, A, dtype)                                    # (N_tok, R)
        att = self.attention(x2, h, Bs, bias)                                   # (N_tok, N)
        self.last_attention = att.detach()
        mixed = self.mix(h, att, Bs, bias)                                      # (N_tok, d_out)
        out = base_out.reshape(-1, base_out.shape[-1]) + self.value_of(mixed)
        return out.view(base_out.shape)


def add_fusion(model: nn.Module, adapters: Sequence[str], config: FusionConfig | None = None, *,
               trainable: bool = True) -> nn.Module:
    """Fuse the adapters `adapters` (already on `model`) with a fusion layer in every layer that
    holds one of them; in place, returns the model. The adapters are frozen and become the active
    adapters; the fusion parameters train when `trainable`. Save and load it with `save_mixture` /
    `load_mixture`. Raises as `add_mixture` does."""
    config = config or FusionConfig()
    if not isinstance(config, FusionConfig):
        raise LoraError(f"config must be a lorakit.FusionConfig, got {type(config).__name__}")
    return attach(model, adapters, lambda layer, names: AdapterFusion(layer, names, config), "fusion",
                  trainable=trainable, train_experts=False)
