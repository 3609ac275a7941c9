"""The adapter math: wrappers that hold a frozen base layer and any number of named adapters.

For a base weight W (d_out x d_in) and adapter factors A (r x d_in), B (d_out x r):

    y = base(x) + sum over active adapters of  scaling * B A dropout(x)      (+ scaling * b_B)

with scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (`lorakit.config.scaling`). Dropout acts
on the adapter path only. GPT-2's `Conv1D` stores W as (d_in x d_out) (`fan_in_fan_out`), so
merging adds the transposed update. Embeddings are the other way round (A zeros, B normal at init;
lookup rows of A^T). Conv layers use a conv A (the base's kernel) and a 1x1 conv B. The variants of
the linear case have their own modules: DoRA `lorakit.dora`, the PiSSA / OLoRA inits
`lorakit.init_from_base`.

Every wrapper runs `LoraLayer.forward`: the base output, then either the `composer` (below) or the
class's `_add_terms` for the active adapters not merged into the base.

Dropout has one source of masks per path:
  - Linear, eager: `lorakit.ops.lora_linear_` draws the mask from a seed taken from torch's global
    generator and keeps it for backward as bits (their layout: `lorakit.ops.dropout_bits`);
  - Linear under `torch.compile`: the same op draws it with `torch.rand` in the graph and keeps it
    as a bool tensor;
  - Linear with the Triton kernels (`LoraLinear.dropout_kernel`): Philox in
    `lorakit.kernels.dropout`, from the eager path's seed, into the same bit layout;
  - DoRA terms and conv layers: `F.dropout` (torch's generator; autograd keeps the mask);
  - embeddings: none.

Other code computes the adapter sum itself, set as a layer's `composer`:
  - `lorakit.compose.per_sample`: a different adapter for each batch row, from the adapters'
    factors stacked once (gathers and batched matmuls); inference only (a layer in training mode
    is refused), so without dropout;
  - `lorakit.compose.mixture`: a mixture of LoRA experts, the gate-weighted sum over the experts'
    concatenated factors, with one `F.dropout` per group of experts sharing a dropout rate;
  - `lorakit.compose.fusion`: AdapterFusion, attention over the adapters' outputs, on the mixture's
    concatenated factors and dropout.

Merging is explicit and idempotent: `merge` folds an adapter into W (remembering it, so its term
is no longer added), `unmerge` takes it back out. Each wrapper keeps PEFT's attribute layout
(`base_layer`, `lora_A.<name>.weight`, ...) so module paths map 1:1 onto PEFT's file keys.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dora, init_from_base
from .base_types import CONV_TYPES, LINEAR_TYPES, expert_parameters, is_conv1d
from .config import scaling
from .errors import AdapterStateError, ConfigError, TargetModulesError
from .init_from_base import rewrites_base
from .kernels.common import runs_on
from .ops import lora_linear_
from .ops.recompute import find_recipe, record_factor
from .quantize import dequantize_weight, is_4bit, weight_dtype


def init_factors(A: Tensor, B: Tensor, bias: Tensor | None, init: bool | str, r: int) -> None:
    """`init_lora_weights` True, "gaussian" or False on factors of any layout (linear or conv):
    A kaiming-uniform with a=sqrt(5) (bound 1/sqrt(fan_in)), or N(0, (1/r)^2) with "gaussian"; B and
    its bias zeros, so step 0 is the base model; with False, B kaiming-uniform too (a random update,
    for debugging)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            B.zero_()
        if bias is not None:
            bias.zero_()


class _Wrapper(nn.Module):
    """Attribute fallthrough: code that reads `layer.weight`, `layer.in_features`, ... on a wrapped
    module gets the wrapped module's attribute, as it did before wrapping."""

    _inner = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(super().__getattr__(self._inner), name)


class LoraLayer(_Wrapper):
    """What every adapter wrapper shares: names, ranks, scalings, active and merged sets, merging, and
    the forward, whose adapter terms each class adds in `_add_terms`."""

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._dora_factor: dict[str, Tensor] = {}  # m / ||W + sBA|| at merge time, for unmerge
        # `composer(layer, x, base_out) -> out` replaces the sum over active adapters while set:
        # per-sample adapters, mixtures of experts and fusion (lorakit.compose) plug in here
        self.composer = None

    # -- adapter management ---------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _record(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool,
                use_dora: bool, lora_bias: bool) -> None:
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = scaling(r, alpha, use_rslora)
        self.lora_dropout[name] = float(dropout)
        self.use_dora[name] = use_dora
        self.lora_bias[name] = lora_bias

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters under their PEFT key suffix (e.g. `lora_A.weight`)."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged into {self.module_name}; unmerge it before deleting it")
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_dora, self.lora_bias):
            table.pop(name, None)
        for container in self._containers():
            if name in container:
                del container[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        raise NotImplementedError

    # -- merging ------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B A in the base weight's layout and dtype float32 (or the weight's, if wider)."""
        raise NotImplementedError

    def merged_weights(self, names: list[str]) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """What merging `names` (in order, skipping merged ones) would write: the new weight, the new
        bias (None if unchanged) and each DoRA adapter's row factor. Computed in float32 at least;
        nothing is modified."""
        weight, bias = self.base_weight(), getattr(self.base_layer, "bias", None)
        work = torch.promote_types(weight.dtype, torch.float32)
        new_w, new_b, factors = weight.detach().to(work), None, {}
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            new_w = new_w + self.delta_weight(name)
            if self.use_dora[name]:
                factors[name] = self._dora_merge_factor(name, new_w)
                new_w = self._apply_row_factor(new_w, factors[name])
            if self.lora_bias[name]:
                new_b = (bias.detach().to(work) if new_b is None else new_b) + \
                    self.scaling[name] * self._lora_b_bias(name).detach().to(work)
        return new_w, new_b, factors

    def base_weight(self) -> Tensor:
        """The base weight in its storage layout; a 4-bit base's dequantized (see lorakit.quantize),
        in the (d_in, d_out) layout of the `Conv1D` it was quantized from, if it was one."""
        base = self.base_layer
        if not is_4bit(base):
            return base.weight
        w = dequantize_weight(base)                                    # (d_out, d_in)
        return w.t() if getattr(base, "from_conv1d", False) else w

    def quantized(self) -> bool:
        """Whether the base weight is stored in 4 bits (QLoRA)."""
        return is_4bit(self.base_layer)

    def check_mergeable(self, names: list[str]) -> None:
        """A 4-bit base weight cannot hold a merge (requantizing W + sBA would round most of the
        update away; PEFT does it with a warning): refuse, and say how to merge instead."""
        if self.quantized() and any(n in self.r and n not in self.merged_adapters for n in names):
            raise AdapterStateError(
                f"cannot merge into the 4-bit NF4 weight of {self.module_name}: requantizing W + s*B@A would round "
                "most of the update away. lorakit.unload(model, merge=True) dequantizes the base and merges there "
                "(or call lorakit.quantize.dequantize_linears(model) before merge_adapters)"
            )

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, in order. Already merged ones are skipped."""
        names = [n for n in names if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        self.check_mergeable(names)
        new_w, new_b, factors = self.merged_weights(names)
        with torch.no_grad():
            self.base_weight().copy_(new_w)   # not 4-bit (refused above): the stored weight itself
            if new_b is not None:
                self.base_layer.bias.copy_(new_b)
        self._dora_factor.update(factors)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, last merged first."""
        weight = self.base_weight()
        work = torch.promote_types(weight.dtype, torch.float32)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = weight.detach().to(work)
            if name in self._dora_factor:
                w = self._apply_row_factor(w, 1.0 / self._dora_factor.pop(name))
            w = w - self.delta_weight(name)
            with torch.no_grad():
                weight.copy_(w)
                if self.lora_bias[name]:
                    self.base_layer.bias.sub_(self.scaling[name] * self._lora_b_bias(name).detach().to(weight.dtype))

    def _lora_b_bias(self, name: str) -> Tensor:
        return self.lora_B[name].bias

    def _dora_merge_factor(self, name: str, new_w: Tensor) -> Tensor:
        raise TargetModulesError(f"DoRA is not supported on {type(self.base_layer).__name__} ({self.module_name})")

    def _apply_row_factor(self, w: Tensor, factor: Tensor) -> Tensor:
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.composer is not None:
            return self.composer(self, x, result)
        names = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        return self._add_terms(x, result, names) if names else result

    def _add_terms(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        """`result` (the base output) plus the terms of the adapters `names` (active, unmerged, at
        least one), in that order."""
        raise NotImplementedError

    def _dropout(self, name: str) -> float:
        """The adapter's dropout probability in effect now: 0 in eval mode."""
        return self.lora_dropout[name] if self.training else 0.0


class LoraLinear(LoraLayer):
    """LoRA around `nn.Linear`, transformers' `Conv1D` (weight stored as (d_in, d_out)) or a
    bitsandbytes 4-bit `Linear4bit` (QLoRA: its forward dequantizes, the adapter term adds on top;
    merging needs a dequantized base, see `check_mergeable`). Its variants call their own modules:
    DoRA adapters `lorakit.dora`, the PiSSA / OLoRA inits `lorakit.init_from_base`."""

    dropout_kernel = False
    """Draw the dropout masks with the Triton kernels (set by `lorakit.train.kernels.use_kernels`)."""

    def __init__(self, base_layer: nn.Module, module_name: str, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = fan_in_fan_out
        if is_4bit(base_layer):   # its weight holds packed codes; the layer keeps the shape
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            w = base_layer.weight
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _containers(self):
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str,
                    use_rslora: bool, use_dora: bool, lora_bias: bool, dtype: torch.dtype | None) -> None:
        base = self.base_layer
        if lora_bias and getattr(base, "bias", None) is None:
            raise ConfigError(f"lora_bias=True needs a base layer with a bias; {self.module_name} has none")
        if lora_bias and use_dora:
            raise ConfigError(f"lora_bias=True cannot be combined with use_dora ({self.module_name})")
        self._record(name, r, alpha, dropout, use_rslora, use_dora, lora_bias)
        kw = {"device": base.weight.device, "dtype": dtype or weight_dtype(base)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)   # weight (r, d_in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)  # weight (d_out, r)
        B = self.lora_B[name]
        init_factors(self.lora_A[name].weight, B.weight, B.bias, True if rewrites_base(init) else init, r)
        if use_dora:
            self._init_magnitude(name)

    def _init_magnitude(self, name: str) -> None:
        """m = ||W + s B A||_row, so DoRA starts at the LoRA model's output (see lorakit.dora)."""
        A = self.lora_A[name].weight
        with torch.no_grad():
            w = self._weight_oi().to(torch.promote_types(self.base_layer.weight.dtype, torch.float32))
            norm = dora.row_norm(w, A, self.lora_B[name].weight, self.scaling[name])   # (d_out,)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(A.dtype))

    def init_from_base(self, name: str, init: str) -> None:
        """PiSSA / OLoRA (see lorakit.init_from_base): A and B from the base weight, which becomes
        the residual W - s B A. Separate from `add_adapter` so that it runs only once every target
        accepted the adapter (a failed add must not leave a rewritten base behind)."""
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        with torch.no_grad():
            w = self._weight_oi().detach().float()                        # (d_out, d_in)
            a, b = init_from_base.factors(w, init, self.r[name], s)       # (r, d_in), (d_out, r)
            A.copy_(a.to(A.dtype))
            B.copy_(b.to(B.dtype))
            res = init_from_base.residual(w, A, B, s)                     # (d_out, d_in)
            base_w = self.base_layer.weight
            base_w.copy_((res.t() if self.fan_in_fan_out else res).to(base_w.dtype))
        if self.use_dora[name]:
            self._init_magnitude(name)

    def _weight_oi(self) -> Tensor:
        """The base weight as (d_out, d_in), whatever its storage layout (dequantized if 4-bit)."""
        w = self.base_weight()
        return w.t() if self.fan_in_fan_out else w

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            params["lora_B.bias"] = self.lora_B[name].bias
        if name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return params

    def delta_weight(self, name: str) -> Tensor:
        work = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        A = self.lora_A[name].weight.detach().to(work)
        B = self.lora_B[name].weight.detach().to(work)
        delta = self.scaling[name] * (B @ A)                          # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def _dora_merge_factor(self, name: str, new_w: Tensor) -> Tensor:
        w_oi = new_w.t() if self.fan_in_fan_out else new_w                # (d_out, d_in)
        return dora.merge_factor(self.lora_magnitude_vector[name], w_oi)

    def _apply_row_factor(self, w: Tensor, factor: Tensor) -> Tensor:
        return w * factor[None, :] if self.fan_in_fan_out else w * factor[:, None]

    def _add_terms(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        if result._base is not None and is_4bit(self.base_layer):
            # bitsandbytes' 4-bit matmul with a bias returns a view of its own output; autograd
            # forbids adding into it in place, so the adapter terms get their own copy
            result = result.clone()
        recipe = find_recipe(x) if self.training else None   # rebuild x in backward instead of keeping it
        dora_names = [n for n in names if self.use_dora[n]]
        if dora_names:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result - bias if bias is not None else result     # W x, before any adapter term
            w = self._weight_oi()                                          # (d_out, d_in)
            # DoRA terms first: they add out of place, so the in-place LoRA adds below never
            # touch `base_out`.
            for name in dora_names:
                result = result + dora.term(x, base_out, weight=w, A=self.lora_A[name].weight,
                                            B=self.lora_B[name].weight,
                                            magnitude=self.lora_magnitude_vector[name],
                                            scaling=self.scaling[name], dropout=self._dropout(name))
        kernel = self.dropout_kernel and self.training and runs_on(x)
        for name in names:
            if not self.use_dora[name]:
                B = self.lora_B[name]
                result = lora_linear_(result, x, A=self.lora_A[name].weight, B=B.weight, bias=B.bias,
                                      scaling=self.scaling[name], dropout=self._dropout(name), recipe=recipe,
                                      kernel=kernel)
        if self.training:
            record_factor(result)   # down_proj may read it, as a factor of the MLP product
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around `nn.Embedding`: A (r, num_embeddings) starts at zero, B (dim, r) normal."""

    def __init__(self, base_layer: nn.Embedding, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _containers(self):
        return [self.lora_embedding_A, self.lora_embedding_B, self.lora_magnitude_vector]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str,
                    use_rslora: bool, use_dora: bool, lora_bias: bool, dtype: torch.dtype | None) -> None:
        base = self.base_layer
        for flag, what in ((use_dora, "use_dora"), (lora_bias, "lora_bias")):
            if flag:
                raise ConfigError(f"{what}=True is not supported on embedding {self.module_name}; exclude it "
                                  "(exclude_modules) or switch it off")
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={init!r} is for Linear layers; embedding {self.module_name} "
                              "supports True, 'gaussian' or False")
        self._record(name, r, alpha, 0.0, use_rslora, False, False)  # no dropout on embeddings
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        num, dim = base.weight.shape
        A = torch.empty(r, num, **kw)
        B = torch.empty(dim, r, **kw)
        nn.init.normal_(B)
        if init is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def delta_weight(self, name: str) -> Tensor:
        work = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        A = self.lora_embedding_A[name].detach().to(work)
        B = self.lora_embedding_B[name].detach().to(work)
        return self.scaling[name] * (B @ A).t()                        # (num_embeddings, dim)

    def output_scale(self) -> float | Tensor:
        """What the base embedding multiplies its lookup by: Gemma's `embed_scale` (sqrt(dim)), else 1.
        The adapter's rows are scaled alike (as PEFT does), so that the adapter term is the lookup
        of the merged table's update and merging changes nothing."""
        scale = getattr(self.base_layer, "embed_scale", None)
        return 1.0 if scale is None else scale

    def _add_terms(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        base = self.base_layer
        scale = self.output_scale()
        if isinstance(scale, Tensor):
            scale = scale.to(result.dtype)
        for name in names:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            rows = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)     # (..., r)
            result = result + (rows @ B.t()).to(result.dtype) * (self.scaling[name] * scale)
        return result


class LoraConv(LoraLayer):
    """LoRA around `nn.Conv1d/2d/3d`: A is a conv with the base's kernel, B a 1x1 conv."""

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        if base_layer.groups != 1:
            raise TargetModulesError(f"{module_name}: grouped convolutions (groups={base_layer.groups}) are not "
                                     "supported; exclude this module")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _containers(self):
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str,
                    use_rslora: bool, use_dora: bool, lora_bias: bool, dtype: torch.dtype | None) -> None:
        base = self.base_layer
        if use_dora:
            raise ConfigError(f"use_dora=True is not supported on {type(base).__name__} {self.module_name}")
        if lora_bias and base.bias is None:
            raise ConfigError(f"lora_bias=True needs a base layer with a bias; {self.module_name} has none")
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={init!r} is for Linear layers; {self.module_name} supports "
                              "True, 'gaussian' or False")
        self._record(name, r, alpha, dropout, use_rslora, False, lora_bias)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        conv = type(base)
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                 base.dilation, bias=False, padding_mode=base.padding_mode, **kw)
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, bias=lora_bias, **kw)
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias, init, r)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            params["lora_B.bias"] = self.lora_B[name].bias
        return params

    def delta_weight(self, name: str) -> Tensor:
        work = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        A = self.lora_A[name].weight.detach().to(work)                  # (r, c_in, *k)
        B = self.lora_B[name].weight.detach().to(work).flatten(1)       # (c_out, r)
        return self.scaling[name] * torch.einsum("or,ri...->oi...", B, A)  # (c_out, c_in, *k)

    def _add_terms(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        for name in names:
            p = self._dropout(name)
            xd = F.dropout(x, p, training=True) if p > 0 else x
            A, B = self.lora_A[name], self.lora_B[name]
            result = result + B(A(xd.to(A.weight.dtype))).to(result.dtype) * self.scaling[name]
        return result


class ModulesToSave(_Wrapper):
    """A module trained in full next to the adapters (e.g. `lm_head`): the original stays frozen,
    each adapter owns a trainable copy, and the first active adapter with a copy is used."""

    _inner = "original_module"

    def __init__(self, original_module: nn.Module, module_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.module_name = module_name
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.modules_to_save[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


def make_lora_layer(module: nn.Module, module_name: str) -> LoraLayer:
    """Wrap a supported base module, or say which types are supported. The weight layout
    (`fan_in_fan_out`) follows the module type, as PEFT corrects it: Conv1D is (d_in, d_out), and so
    is a 4-bit layer quantized from one (lorakit.quantize), so its adapter config is unchanged."""
    if isinstance(module, LINEAR_TYPES):   # a 4-bit layer is an nn.Linear
        transposed = is_conv1d(module) or getattr(module, "from_conv1d", False)
        return LoraLinear(module, module_name, fan_in_fan_out=transposed)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module, module_name)
    if isinstance(module, CONV_TYPES):
        return LoraConv(module, module_name)
    experts = expert_parameters(module)
    if experts:
        raise TargetModulesError(
            f"target module {module_name} is a {type(module).__name__}, whose experts are fused 3-D weights "
            f"({', '.join(experts)}), not layers: adapt them with target_parameters, e.g. "
            f"{[module_name.rsplit('.', 1)[-1] + '.' + p for p in experts]}, or target_modules 'all-linear'"
        )
    raise TargetModulesError(
        f"target module {module_name} is a {type(module).__name__}; LoRA supports nn.Linear, transformers "
        "Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Narrow target_modules or add it to exclude_modules"
    )
