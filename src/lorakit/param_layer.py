"""LoRA on a parameter rather than a layer: the fused expert weights of mixture-of-experts models.

transformers 5 keeps the experts of Mixtral, Qwen2/3-MoE, gpt-oss and DeepSeek-style models as
3-D parameters of one module (`experts.gate_up_proj` (E, 2I, d), `experts.down_proj` (E, d, I))
that its forward indexes per expert, not as `nn.Linear` layers. PEFT adapts them with
`target_parameters`; `LoraParameter` is the same adapter, in PEFT's layout, so files move both ways:

    W_e' = W_e + scaling * B_e A_e          for every expert e, W_e (d_out, d_in)

    lora_A.weight  (E*r, d_in)    rows e*r .. e*r+r-1 are A_e
    lora_B.weight  (d_out, r*E)   column k*E + e is column k of B_e

A 3-D parameter is (E, d_out, d_in) unless its module sets `is_transposed` (then (E, d_in, d_out));
a 2-D one is one (d_out, d_in) matrix (E = 1).

The update cannot be added to the output, as a linear layer's is, because the module's own forward
picks the experts: the parameter itself is replaced by W + delta for the duration of the module's
forward, through `torch.nn.utils.parametrize` (cached, so an expert loop reads it once), and
autograd reaches A and B through that sum. So there is no dropout (it would have to act on the
input of each expert's matmul, inside the module's forward): the layer records 0, and the
injector says so. One wrapper adapts one parameter; a module with several adapted parameters gets
one wrapper inside the other, in the order the module registers the parameters, which is what
makes the module paths, and so the file keys, PEFT's (`experts.base_layer.lora_A.weight` for the
first of two).

The parameter may be a 4-bit NF4 weight (QLoRA, `lorakit.quantize.quantize_experts`): it is then
itself a parametrization that dequantizes, and the update is chained after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError, TargetModulesError
from .init_from_base import rewrites_base
from .layers import LoraLayer, init_factors
from .quantize import is_nf4_parameter


def parameter_chain(module: nn.Module) -> list[LoraParameter]:
    """The `LoraParameter` wrappers nested at `module`, outermost first (empty for any other module)."""
    chain = []
    while isinstance(module, LoraParameter):
        chain.append(module)
        module = module.base_layer
    return chain


def owner_of(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any number of `LoraParameter` wrappers."""
    chain = parameter_chain(module)
    return chain[-1].base_layer if chain else module


class _AddUpdates(nn.Module):
    """The parametrization W -> W + sum of the active adapters' updates, for one forward."""

    def __init__(self, layer: LoraParameter, names: list[str]) -> None:
        super().__init__()
        self._layer = [layer]   # in a list: not a submodule (the parametrization must not own the adapters)
        self.names = names

    def forward(self, w: Tensor) -> Tensor:
        layer = self._layer[0]
        for name in self.names:
            w = w + layer.update(name, w.dtype)
        return w


class LoraParameter(LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (PEFT's `target_parameters`)."""

    def __init__(self, base_layer: nn.Module, module_name: str, parameter_name: str) -> None:
        super().__init__(base_layer, f"{module_name}.{parameter_name}")
        self.parameter_name = parameter_name
        w = self.parameter()
        if w.dim() not in (2, 3):
            raise TargetModulesError(f"target parameter {self.module_name} has shape {tuple(w.shape)}; LoRA adapts "
                                     "2-D weights and 3-D stacks of expert weights only")
        self.transposed = w.dim() == 3 and bool(getattr(owner_of(base_layer), "is_transposed", False))
        self.stacked = w.dim() == 3   # kept: reading the parameter inside its own parametrization would recurse
        self.num_experts = w.shape[0] if self.stacked else 1
        d1, d2 = w.shape[-2:]
        self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def parameter(self) -> Tensor:
        """The adapted weight as the module's forward sees it without adapters (an NF4 weight
        dequantized)."""
        return getattr(owner_of(self.base_layer), self.parameter_name)

    def _containers(self):
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str,
                    use_rslora: bool, use_dora: bool, lora_bias: bool, dtype: torch.dtype | None) -> None:
        for flag, what in ((use_dora, "use_dora"), (lora_bias, "lora_bias")):
            if flag:
                raise ConfigError(f"{what}=True is not supported on the parameter {self.module_name} (PEFT's "
                                  "target_parameters do not support it either); switch it off or leave the "
                                  "parameter out of target_parameters")
        if init not in (True, False, "gaussian") or rewrites_base(init):
            raise ConfigError(f"init_lora_weights={init!r} is for Linear layers; the parameter {self.module_name} "
                              "supports True, 'gaussian' or False")
        self._record(name, r, alpha, 0.0, use_rslora, False, False)   # no dropout: see the module doc
        w = self.parameter()
        kw = {"device": w.device, "dtype": dtype or w.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, **kw)  # (E*r, d_in)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, **kw)  # (d_out, r*E)
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, None, init, r)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    # -- the update ------------------------------------------------------------------------------

    def _update(self, name: str, A: Tensor, B: Tensor) -> Tensor:
        """scaling * B_e A_e for every expert, in the parameter's layout."""
        E, r = self.num_experts, self.r[name]
        A3 = A.reshape(E, r, self.in_features)                           # (E, r, d_in)
        B3 = B.reshape(self.out_features, r, E).permute(2, 0, 1)         # (E, d_out, r)
        delta = self.scaling[name] * torch.bmm(B3, A3)                   # (E, d_out, d_in)
        if self.transposed:
            delta = delta.transpose(1, 2)                                # (E, d_in, d_out)
        return delta if self.stacked else delta[0]

    def update(self, name: str, dtype: torch.dtype) -> Tensor:
        """The update in `dtype`, in the autograd graph of A and B (for the forward)."""
        return self._update(name, self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype))

    def delta_weight(self, name: str) -> Tensor:
        work = torch.promote_types(self.parameter().dtype, torch.float32)
        A, B = self.lora_A[name].weight.detach().to(work), self.lora_B[name].weight.detach().to(work)
        return self._update(name, A, B)

    def base_weight(self) -> Tensor:
        return self.parameter()

    def quantized(self) -> bool:
        return is_nf4_parameter(owner_of(self.base_layer), self.parameter_name)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        # A composer (lorakit.compose) is set here only when none of its adapters is on this layer: they
        # refuse adapted parameters. The base then runs alone, as a Linear layer's composer would run it.
        names = [] if self.disabled or self.composer is not None else \
            [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        with self._updated(names):
            return self.base_layer(*args, **kwargs)

    @contextlib.contextmanager
    def _updated(self, names: list[str]) -> Iterator[None]:
        """Within the block the owner's parameter reads W + the adapters' updates (computed once)."""
        owner = owner_of(self.base_layer)
        parametrize.register_parametrization(owner, self.parameter_name, _AddUpdates(self, names), unsafe=True)
        try:
            with parametrize.cached():
                yield
        finally:
            chain = owner.parametrizations[self.parameter_name]
            if len(chain) == 1:
                parametrize.remove_parametrizations(owner, self.parameter_name, leave_parametrized=False)
            else:   # an NF4 weight: its dequantizing parametrization stays
                del chain[len(chain) - 1]
