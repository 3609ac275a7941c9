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
bookkeeping and the file format; the composer is the `composer` hook of
`lorakit.layers.LoraLayer`, registered as a submodule of each layer, so its parameters are the
model's parameters (optimisers, DDP, FSDP2 and `state_dict` see them).

Files (`save_mixture`): a directory with

    mixture_config.json         {"format": "lorakit-mixture", "format_version": 1, "kind": "moe" | "fusion",
                                 "experts": [names], "config": {MixtureConfig or FusionConfig fields}}
    mixture_model.safetensors   the gate (or fusion) parameters, keys "<module path>.<parameter>",
                                e.g. "model.layers.0.self_attn.q_proj.router.weight"
    <expert>/                   each expert in PEFT format (adapter_config.json + adapter_model.safetensors)

Not supported, each with an error when the mixture is added: DoRA experts, experts merged into the
base, experts held by embedding or conv layers, and experts with `modules_to_save` copies.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterStateError, ConfigError, LoraError
from ..inject import (
    _NAME_RE,
    _check_known,
    _set_trainable,
    delete_adapter,
    get_state,
    lora_layers,
    set_active_adapters,
    wrappers,
)
from ..io import (
    _atomic_write,
    full_adapter_state_dict,
    gather_full,
    load_adapter,
    load_adapter_weights,
    shard_like,
    write_adapter,
)
from ..layers import LoraLayer, LoraLinear, ModulesToSave
from ..schema import from_dict

CONFIG_NAME = "mixture_config.json"
WEIGHTS_NAME = "mixture_model.safetensors"
FORMAT = "lorakit-mixture"
FORMAT_VERSION = 1
KINDS = ("moe", "fusion")


@dataclass
class MixtureConfig:
    top_k: int | None = None
    """Experts mixed per token: null for all of them (dense softmax), k for the k most probable."""
    temperature: float = 1.0
    """Gate softmax temperature: softmax(logits / temperature); lower is sharper."""
    renormalize: bool = True
    """With top_k, rescale the kept probabilities to sum to 1 (false: Switch style, keeps top_k=1 trainable)."""

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"MixtureConfig.top_k must be an integer >= 1 or None (dense), got {self.top_k!r}")
        _check_temperature(self)


def _check_temperature(config: Any) -> None:
    value = config.temperature
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{type(config).__name__}.temperature must be a number > 0, got {value!r}")


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
    _check_known(state, names)
    if composers(model):
        raise AdapterStateError(f"this model already has a mixture or fusion; call remove_mixture before adding a {what}")
    layers = [layer for _, layer in lora_layers(model) if any(e in layer.r for e in names)]
    for layer in layers:
        held = [e for e in names if e in layer.r]
        if not isinstance(layer, LoraLinear):
            raise AdapterStateError(f"{what} supports Linear layers only; {layer.module_name} "
                                    f"({type(layer.base_layer).__name__}) holds {held}. Train the experts without "
                                    "embedding / conv targets")
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
        _set_trainable(model, e, state.configs[e], train_experts)
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


# ---- files -------------------------------------------------------------------------------------


@dataclass
class MixtureFiles:
    """Everything a saved mixture holds, as whole CPU tensors (what `write_mixture` writes)."""

    meta: dict[str, Any]
    """The content of mixture_config.json."""
    tensors: dict[str, Tensor]
    """The composers' parameters, keyed "<module path>.<parameter>"."""
    experts: dict[str, tuple[dict[str, Tensor], LoraConfig]]
    """Each expert's tensors (PEFT keys) and config."""


def _composer_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The live composer parameters under their file keys."""
    return {f"{layer.module_name}.{key}": p for layer, c in composers(model) for key, p in c.named_parameters()}


def gather_mixture(model: nn.Module) -> MixtureFiles:
    """The mixture (or fusion) of `model` as whole CPU tensors. On a model sharded by FSDP2 this
    is a collective: every process must call it."""
    found = composers(model)
    if not found:
        raise AdapterStateError("this model has no mixture or fusion to save; call add_mixture or add_fusion first")
    first = found[0][1]
    state = get_state(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": first.kind, "experts": first.experts,
            "config": asdict(first.config)}
    tensors = {k: gather_full(v) for k, v in _composer_tensors(model).items()}
    experts = {e: (full_adapter_state_dict(model, e), state.configs[e]) for e in first.experts}
    return MixtureFiles(meta, tensors, experts)


def write_mixture(path: str | os.PathLike, files: MixtureFiles) -> None:
    """Write a mixture directory from `gather_mixture`'s result (each file atomically)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for e, (tensors, config) in files.experts.items():
        write_adapter(root / e, tensors, config)
    _atomic_write(root / WEIGHTS_NAME, lambda tmp: save_file(files.tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(files.meta, indent=2) + "\n"
    _atomic_write(root / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def save_mixture(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's mixture of experts or fusion to directory `path`: mixture_config.json,
    mixture_model.safetensors and each expert in PEFT format in `path/<expert>/`."""
    write_mixture(path, gather_mixture(model))


def _config_class(kind: str) -> type:
    from .fusion import FusionConfig  # fusion builds on this module

    return {"moe": MixtureConfig, "fusion": FusionConfig}[kind]


def read_mixture_config(path: str | os.PathLike) -> tuple[str, list[str], Any]:
    """(kind, experts, MixtureConfig or FusionConfig) of a saved mixture directory, validated."""
    root = Path(path)
    file = root / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a saved mixture directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (written by lorakit.save_mixture)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterFileError(f"{file} is not a lorakit mixture config (expected \"format\": \"{FORMAT}\"); "
                               "save the mixture with lorakit.save_mixture")
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterFileError(f"{file}: format_version {version!r} is not one this lorakit reads (1 to "
                               f"{FORMAT_VERSION}); upgrade lorakit")
    unknown = sorted(set(data) - {"format", "format_version", "kind", "experts", "config"})
    if unknown:
        raise AdapterFileError(f"{file}: unknown keys {unknown}; the file was edited or written by another tool")
    kind = data.get("kind")
    if kind not in KINDS:
        raise AdapterFileError(f"{file}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    experts = data.get("experts")
    if (not isinstance(experts, list) or not experts or len(set(map(str, experts))) != len(experts)
            or not all(isinstance(e, str) and _NAME_RE.fullmatch(e) for e in experts)):
        raise AdapterFileError(f"{file}: experts must be a non-empty list of distinct adapter names, got {experts!r}")
    try:
        config = from_dict(_config_class(kind), data.get("config"), "config")
    except ConfigError as e:
        raise AdapterFileError(f"{file}: {e}") from None
    return kind, experts, config


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a saved mixture directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read as safetensors: {e}") from None


def _copy_composer_weights(model: nn.Module, file: Path) -> None:
    tensors = _read_weights(file)
    expected = _composer_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
        raise AdapterFileError(f"{file} does not fit this model's mixture ({'; '.join(parts)}); it was saved from "
                               "another base model or with experts that target other modules")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterFileError(f"{file}: {key} has shape {tuple(tensor.shape)} but this model's mixture expects "
                                   f"{tuple(expected[key].shape)}; it was saved from another base model or config")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(shard_like(tensor, expected[key]))


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def load_mixture(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False,
                 train_experts: bool = False) -> nn.Module:
    """Load a saved mixture of experts or fusion (`save_mixture`) into `model`: its experts under
    their saved names, then its gates or fusion layers. In place, returns the model. On any error
    nothing stays loaded. Raises AdapterStateError if the model already has an adapter of an
    expert's name or a mixture, AdapterFileError for files that are corrupt or do not fit."""
    from .fusion import add_fusion  # fusion builds on this module

    root = Path(path)
    kind, experts, config = read_mixture_config(root)
    if getattr(model, "_lorakit", None) is not None and composers(model):
        raise AdapterStateError("this model already has a mixture or fusion; call remove_mixture before loading another")
    loaded: list[str] = []
    attached = False
    try:
        for e in experts:
            load_adapter(model, root / e, name=e, trainable=train_experts, activate=False)
            loaded.append(e)
        if kind == "moe":
            add_mixture(model, experts, config, trainable=trainable, train_experts=train_experts)
        else:
            add_fusion(model, experts, config, trainable=trainable)
        attached = True
        _copy_composer_weights(model, root / WEIGHTS_NAME)
    except BaseException:
        if attached:
            remove_mixture(model)
        for e in loaded:
            delete_adapter(model, e)
        raise
    return model


def load_mixture_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved mixture's weights (gates or fusion layers, and experts) into the model's own
    mixture, which must have the same kind, experts and config (e.g. to resume training)."""
    found = composers(model)
    if not found:
        raise AdapterStateError("this model has no mixture or fusion to load weights into")
    root = Path(path)
    kind, experts, config = read_mixture_config(root)
    mine = found[0][1]
    if (kind, experts, config) != (mine.kind, mine.experts, mine.config):
        raise AdapterFileError(f"{root / CONFIG_NAME} describes a {kind} of {experts} with {config}, but this model has "
                               f"a {mine.kind} of {mine.experts} with {mine.config}")
    for e in experts:
        load_adapter_weights(model, root / e, e)
    _copy_composer_weights(model, root / WEIGHTS_NAME)
