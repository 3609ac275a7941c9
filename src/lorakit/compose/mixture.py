"""Mixture of LoRA experts: several adapters in each adapted layer, mixed per token by a trained gate.

For a layer holding experts e = 1..E (adapters s_e, B_e, A_e), with input x (one token):

    logits = W_g x                          W_g (E, d_in): the gate, zero at init (uniform mixture)
    p      = softmax(logits / temperature)  (E,)
    g      = p                              dense
           = top-k of p, renormalised       top_k = k: the k largest p_e, divided by their sum
                                            (`renormalize=False` keeps them as they are, as the Switch
                                            Transformer does, so that top_k = 1 still passes the task
                                            loss's gradient to the gate)
    y      = base(x) + sum_e g_e * s_e B_e A_e dropout_e(x)   (+ g_e s_e b_e with lora_bias)

Computed without materialising E outputs: the experts' factors are concatenated once per forward
(A_cat (R, d_in), R = sum r_e; Bs_cat (d_out, R) = [s_1 B_1 | ... | s_E B_E]) and each column of
h = dropout(x) A_cat^T is weighted by the gate of the expert it belongs to:

    y = base(x) + (h * g[col_expert]) Bs_cat^T           h, g[col_expert]: (N, R)

so the cost is that of one adapter of rank R. The logits are computed in the input's dtype (no fp32
copy of the layer input is kept for backward) and the softmax in fp32.

Auxiliary losses (recorded at every training-mode forward, read with `mixture_aux_loss`), over the N
tokens a layer sees (padding included), averaged over the mixture's layers:

    balance = E * sum_e f_e * P_e     f_e = share of tokens whose top-1 expert is e (no gradient),
                                      P_e = mean over tokens of p_e; 1 when balanced (Switch Transformer)
    z       = mean over tokens of logsumexp(logits)^2       (router z-loss, ST-MoE)

Training: the experts are existing adapters; `train_experts=False` trains the gate alone over them
(frozen), `True` trains them jointly with it. AdapterFusion (`fusion.py`) shares the experts'
bookkeeping; the composer is the `composer` hook of
`lorakit.layers.LoraLayer`, registered as a submodule of each layer, so its parameters are the
model's parameters (optimisers, DDP, FSDP2 and `state_dict` see them).

Files: `mixture_files.py` (`save_mixture`, `load_mixture`).

Not supported, each with an error when the mixture is added: DoRA experts, experts merged into the
base, experts held by embedding or conv layers, and experts with `modules_to_save` copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterStateError, ConfigError, LoraError
from ..inject import (
    check_known,
    get_state,
    lora_layers,
    set_active_adapters,
    set_trainable,
    wrappers,
)
from ..layers import LoraLayer, LoraLinear, ModulesToSave
from .settings import MixtureConfig


@dataclass
class MixtureLosses:
    balance: Tensor
    """Switch load-balancing loss E * sum_e f_e P_e, averaged over layers (1 when balanced)."""
    z: Tensor
    """Router z-loss, mean logsumexp(logits)^2, averaged over layers."""


class ExpertComposer(nn.Module):
    """What a mixture and a fusion share in one layer: the experts it holds, their factors
    concatenated in column order, and the mixing of per-expert weights into the output.

    Columns are ordered with the experts grouped by dropout rate, so each rate takes one dropout of
    x and one matmul; `col_expert[j]` is the expert (index into `self.names`) of column j."""

    kind: ClassVar[str]

    def __init__(self, layer: LoraLinear, experts: list[str], config: Any) -> None:
        super().__init__()
        self.experts = list(experts)                       # the whole mixture's experts, in order
        self.names = [e for e in experts if e in layer.r]  # those this layer holds
        self.config = config
        rates = [layer.lora_dropout[e] for e in self.names]
        self.groups = [(p, [i for i, q in enumerate(rates) if q == p]) for p in dict.fromkeys(rates)]
        self.order = [i for _, members in self.groups for i in members]   # expert of each column block
        col = [i for i in self.order for _ in range(layer.r[self.names[i]])]
        device = layer.lora_A[self.names[0]].weight.device
        self.register_buffer("col_expert", torch.tensor(col, dtype=torch.long, device=device), persistent=False)

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def param_dtype(self, layer: LoraLinear) -> torch.dtype:
        """The experts' own dtype, which the composer's parameters take too."""
        return layer.lora_A[self.names[0]].weight.dtype

    def _check(self, layer: LoraLayer) -> None:
        missing = [e for e in self.names if e not in layer.r]
        if missing:
            raise AdapterStateError(f"experts {missing} of the {self.kind} in {layer.module_name} were deleted; "
                                    "call remove_mixture before deleting its experts")
        if layer.merged_adapters:
            raise AdapterStateError(f"adapters {layer.merged_adapters} are merged into {layer.module_name}, so the "
                                    f"{self.kind} would add them twice; call unmerge_adapters first")

    def factors(self, layer: LoraLinear) -> tuple[Tensor, Tensor, Tensor | None]:
        """(A_cat (R, d_in), Bs_cat (d_out, R) with each expert's scaling folded in, and the experts'
        scaled lora_bias (E, d_out) in expert order, or None), in the experts' dtype, live (with
        gradient when the experts train)."""
        names = [self.names[i] for i in self.order]
        A = torch.cat([layer.lora_A[e].weight for e in names])                                 # (R, d_in)
        Bs = torch.cat([layer.lora_B[e].weight * layer.scaling[e] for e in names], dim=1)      # (d_out, R)
        bias = None
        if any(layer.lora_bias[e] for e in self.names):
            zero = Bs.new_zeros(Bs.shape[0])
            bias = torch.stack([layer.lora_B[e].bias * layer.scaling[e] if layer.lora_bias[e] else zero
                                for e in self.names])                                          # (E, d_out)
        return A, Bs, bias

    def hidden(self, layer: LoraLinear, x2: Tensor, A: Tensor, dtype: torch.dtype) -> Tensor:
        """h = dropout_e(x) A_e^T for every expert, in column order: (N, R), in `dtype`."""
        parts, start = [], 0
        for p, members in self.groups:
            rank = sum(layer.r[self.names[i]] for i in members)
            xd = F.dropout(x2, p, training=True) if p > 0 and layer.training else x2
            parts.append(xd.to(dtype) @ A[start:start + rank].to(dtype).t())                   # (N, r_group)
            start += rank
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def mix(self, h: Tensor, weights: Tensor, Bs: Tensor, bias: Tensor | None) -> Tensor:
        """sum_e weights_e * s_e B_e A_e x (+ weights_e s_e b_e): (N, d_out), for weights (N, E)."""
        dtype = h.dtype
        w = weights.to(dtype)
        out = (h * w[:, self.col_expert]) @ Bs.to(dtype).t()                                  # (N, d_out)
        if bias is not None:
            out = out + w @ bias.to(dtype)
        return out

    def extra_repr(self) -> str:
        return f"experts={self.names}, config={self.config}"


class MixtureOfExperts(ExpertComposer):
    """The gate of one layer (see the module docstring). `last_losses` holds the (balance, z) of
    the last training-mode forward."""

    kind = "moe"

    def __init__(self, layer: LoraLinear, experts: list[str], config: MixtureConfig) -> None:
        super().__init__(layer, experts, config)
        self.router = nn.Linear(layer.in_features, self.n_experts, bias=False, device=self.col_expert.device,
                                dtype=self.param_dtype(layer))                                  # (E, d_in)
        nn.init.zeros_(self.router.weight)
        self.last_losses: tuple[Tensor, Tensor] | None = None

    def gates(self, logits: Tensor) -> Tensor:
        """(N, E) mixing weights from (N, E) fp32 logits."""
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        k = self.config.top_k
        if k is None or k >= self.n_experts:
            return probs
        top, idx = probs.topk(k, dim=-1)                                                        # (N, k)
        if self.config.renormalize:
            top = top / top.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, top)

    def forward(self, layer: LoraLinear, x: Tensor, base_out: Tensor) -> Tensor:
        self._check(layer)
        dtype = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1])                                                         # (N, d_in)
        logits = F.linear(x2, self.router.weight.to(x2.dtype)).float()                          # (N, E)
        gates = self.gates(logits)
        if self.training:
            self.last_losses = self._losses(logits)
        A, Bs, bias = self.factors(layer)
        h = self.hidden(layer, x2, A, dtype)                                                    # (N, R)
        out = base_out.reshape(-1, base_out.shape[-1]) + self.mix(h, gates, Bs, bias)          # (N, d_out)
        return out.view(base_out.shape)

    def _losses(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(logits / self.config.temperature, dim=-1)                        # (N, E)
        E = self.n_experts
        f = torch.bincount(probs.argmax(-1), minlength=E).to(probs.dtype) / probs.shape[0]     # (E,)
        balance = E * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return balance, z


# ---- managing ----------------------------------------------------------------------------------


def composers(model: nn.Module) -> list[tuple[LoraLinear, ExpertComposer]]:
    """(layer, composer) for every layer that holds a mixture's or a fusion's composer."""
    return [(layer, layer.composer) for _, layer in lora_layers(model) if isinstance(layer.composer, ExpertComposer)]


def attach(model: nn.Module, experts: Sequence[str], build: Callable[[LoraLinear, list[str]], ExpertComposer],
           what: str, *, trainable: bool, train_experts: bool) -> nn.Module:
    """Give every layer that holds one of `experts` a composer from `build`; the experts become the
    active adapters, train per `train_experts`, and the composers per `trainable`. Every check runs
    before anything changes."""
    state = get_state(model)
    if isinstance(experts, str) or not isinstance(experts, Sequence) or not all(isinstance(e, str) for e in experts):
        raise LoraError(f"{what} needs a list of adapter names, got {experts!r}")
    names = list(experts)
    if not names:
        raise LoraError(f"{what} needs at least one adapter name")
    if len(set(names)) != len(names):
        raise LoraError(f"{what} was given an adapter more than once: {names}")
    check_known(state, names)
    if composers(model):
        raise AdapterStateError(f"this model already has a mixture or fusion; call remove_mixture before adding a {what}")
    layers = [layer for _, layer in lora_layers(model) if any(e in layer.r for e in names)]
    for layer in layers:
        held = [e for e in names if e in layer.r]
        if not isinstance(layer, LoraLinear):
            raise AdapterStateError(f"{what} supports Linear layers only; {layer.module_name} "
                                    f"({type(layer.base_layer).__name__}) holds {held}. Train the experts on Linear "
                                    "layers only (no embedding, conv or fused-expert targets: on a mixture-of-experts "
                                    "model, lora.exclude_modules: [experts])")
        dora = [e for e in held if layer.use_dora[e]]
        if dora:
            raise AdapterStateError(f"{what} does not support DoRA adapters: {dora} use DoRA in {layer.module_name}")
        if layer.merged_adapters:
            raise AdapterStateError(f"adapters {layer.merged_adapters} are merged into {layer.module_name}; call "
                                    f"unmerge_adapters before adding a {what}")
        if layer.composer is not None:
            raise AdapterStateError(f"{layer.module_name} already has a composer (per_sample_adapters?); add the "
                                    f"{what} outside that block")
    copies = sorted({e for _, m in wrappers(model) if isinstance(m, ModulesToSave) for e in m.adapter_names
                     if e in names})
    if copies:
        raise AdapterStateError(f"adapters {copies} have modules_to_save copies, which a {what} cannot mix per token; "
                                "use experts trained without modules_to_save")
    built = [build(layer, names) for layer in layers]
    set_active_adapters(model, names)   # layers without a composer then add no other adapter
    for e in names:
        set_trainable(model, e, state.configs[e], train_experts)
    for layer, composer in zip(layers, built, strict=True):
        composer.requires_grad_(trainable)
        composer.train(layer.training)
        layer.composer = composer
    return model


def add_mixture(model: nn.Module, experts: Sequence[str], config: MixtureConfig | None = None, *,
                trainable: bool = True, train_experts: bool = False) -> nn.Module:
    """Mix the adapters `experts` (already on `model`) per token with a gate in every layer that
    holds one of them, starting from the uniform mixture; in place, returns the model.

    The gates train when `trainable`; the experts when `train_experts` (False: gate-only training).
    The experts become the active adapters. Raises AdapterStateError for unknown names, a model
    that already has a mixture, or experts the mixture cannot run (see the module docstring), and
    ConfigError for a top_k above the number of experts."""
    config = config or MixtureConfig()
    if not isinstance(config, MixtureConfig):
        raise LoraError(f"config must be a lorakit.MixtureConfig, got {type(config).__name__}")
    if config.top_k is not None and not isinstance(experts, str) and config.top_k > len(experts):
        raise ConfigError(f"top_k={config.top_k} is more than the {len(experts)} experts given")
    return attach(model, experts, lambda layer, names: MixtureOfExperts(layer, names, config), "mixture of experts",
                  trainable=trainable, train_experts=train_experts)


def remove_mixture(model: nn.Module) -> None:
    """Take the mixture's (or fusion's) composers off; the experts stay, active, so their terms are
    summed again. Raises AdapterStateError if there is none."""
    found = composers(model)
    if not found:
        raise AdapterStateError("this model has no mixture or fusion to remove")
    for layer, _ in found:
        del layer.composer        # unregister the submodule, so a plain composer can be set again
        layer.composer = None


def mixture_aux_loss(model: nn.Module) -> MixtureLosses:
    """The load-balancing and z losses of the last training-mode forward, averaged over the layers
    of the mixture of experts (differentiable: add `coef * loss` to the training loss)."""
    gates = [c for _, c in composers(model) if isinstance(c, MixtureOfExperts)]
    if not gates:
        raise AdapterStateError("this model has no mixture of experts; call add_mixture first")
    recorded = [c.last_losses for c in gates if c.last_losses is not None]
    if len(recorded) != len(gates):
        raise AdapterStateError("no training-mode forward has run through every layer of the mixture yet; call "
                                "model.train() and run a forward before mixture_aux_loss")
    return MixtureLosses(balance=torch.stack([b for b, _ in recorded]).mean(),
                         z=torch.stack([z for _, z in recorded]).mean())
