"""The model on the meta device with the adapter injected: parameter counts per module type, the
adapter file's size, and the shapes the memory model needs.

No weight is loaded or allocated: `AutoModelForCausalLM.from_config` under `torch.device("meta")`
builds every parameter as shape and dtype only, and `lorakit.add_adapter` injects into it the same
way `lorakit train` does (adapters in fp32), so a 70B config plans in seconds on a laptop.

Closed form, per adapted matrix W (d_out x d_in) of rank r: r (d_in + d_out) for A and B, plus d_out
for a DoRA magnitude and d_out for a LoRA bias; an embedding (num x dim): r (num + dim); a conv:
r (c_in k + c_out). `modules_to_save` copies and trained biases count their own size.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .. import inject, io
from ..base_types import LINEAR_TYPES, expert_parameters
from ..config import LoraConfig
from ..errors import ConfigError
from ..layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from ..model_io import resolve_model_path
from ..param_layer import LoraParameter
from .estimate import Arch, LayerAdapters, Trainables, Weights

ADAPTER = "default"
_POSITION = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "c_attn": "qkv",
             "query_key_value": "qkv", "o_proj": "o", "attn.c_proj": "o", "gate_proj": "up", "up_proj": "up",
             "gate_up_proj": "up", "c_fc": "up", "down_proj": "down", "mlp.c_proj": "down"}
_EXACT = ("llama", "mistral", "qwen2")
"""Model types whose decoder layer is the one the activation model counts (measured: llama)."""
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


@dataclass
class ModuleGroup:
    """The adapted modules of one type (e.g. every layer's self_attn.q_proj)."""

    name: str
    """The module path after the layer index: "self_attn.q_proj", "embed_tokens", "lm_head"."""
    kind: str
    """"lora", "lora embedding", "lora conv", "full copy" (modules_to_save) or "bias"."""
    modules: int
    shape: str
    """d_in x d_out of one module ("various" if they differ)."""
    ranks: list[int]
    trainable: int
    """Counted on the injected model."""
    closed_form: int
    """r (d_in + d_out) per matrix (see the module docstring)."""
    share: float
    """Of all parameters (base + adapter), as PEFT reports trainable%."""
    bytes: int
    """Tensor bytes in the adapter file."""


@dataclass
class ParamReport:
    groups: list[ModuleGroup]
    trainable: int
    """`lorakit.trainable_parameters` of the injected model."""
    total: int
    closed_form: int
    file_bytes: int
    """adapter_model.safetensors, exact (header included)."""
    config_bytes: int
    """adapter_config.json."""


def load_model_config(source: str, revision: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config from a directory, a config.json file or a hub id; no weights."""
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot read a model config from {source!r}: give a model directory, its config.json, or a hub id "
            f"reachable from here ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{source!r} is not a transformers model config: {str(e).splitlines()[0]}") from None


def meta_model(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def inject_adapter(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Add the adapter as `lorakit train` does (fp32 adapter weights); return add_adapter's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inject.add_adapter(model, lora, ADAPTER, adapter_dtype=torch.float32)
    return [str(w.message) for w in caught]


def group_name(module_name: str) -> str:
    """The module path after its layer index ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"),
    or its last component outside the layers ("model.embed_tokens" -> "embed_tokens")."""
    parts = module_name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else parts[-1]


def _closed_form(layer: LoraLayer) -> tuple[int, str]:
    """(closed-form parameter count, "d_in x d_out") of one adapted module."""
    r = layer.r[ADAPTER]
    if isinstance(layer, LoraParameter):   # one (r x d_in, d_out x r) pair per expert
        E, d_in, d_out = layer.num_experts, layer.in_features, layer.out_features
        return E * r * (d_in + d_out), f"{E} x {d_in} x {d_out}"
    if isinstance(layer, LoraLinear):
        d_in, d_out = layer.in_features, layer.out_features
        extra = d_out * (layer.use_dora[ADAPTER] + layer.lora_bias[ADAPTER])
        return r * (d_in + d_out) + extra, f"{d_in} x {d_out}"
    if isinstance(layer, LoraEmbedding):
        num, dim = layer.base_layer.weight.shape
        return r * (num + dim), f"{num} x {dim}"
    conv = layer.base_layer   # LoraConv
    d_in = conv.in_channels * math.prod(conv.kernel_size)
    return r * (d_in + conv.out_channels) + conv.out_channels * layer.lora_bias[ADAPTER], \
        f"{d_in} x {conv.out_channels}"


def parameter_report(model: nn.Module) -> ParamReport:
    """Per module type and in total, from the injected (meta) model."""
    trainable, total = inject.trainable_parameters(model)
    rows: dict[tuple[str, str], dict] = {}
    counted: set[int] = set()

    def add(name: str, kind: str, params: dict[str, nn.Parameter], closed: int, shape: str, rank: int | None):
        row = rows.setdefault((name, kind), {"modules": 0, "shapes": set(), "ranks": set(), "trainable": 0,
                                             "closed": 0, "bytes": 0})
        row["modules"] += 1
        row["shapes"].add(shape)
        if rank is not None:
            row["ranks"].add(rank)
        for p in params.values():
            if p.requires_grad and id(p) not in counted:
                counted.add(id(p))
                row["trainable"] += p.numel()
                row["bytes"] += p.numel() * p.element_size()
        row["closed"] += closed

    for module_name, module in inject.wrappers(model):
        if ADAPTER not in module.adapter_names:
            continue
        params = module.adapter_parameters(ADAPTER)
        if isinstance(module, ModulesToSave):
            size = sum(p.numel() for p in params.values())
            add(group_name(module_name), "full copy", params, size, "-", None)
            continue
        closed, shape = _closed_form(module)
        kind = {LoraLinear: "lora", LoraEmbedding: "lora embedding", LoraConv: "lora conv",
                LoraParameter: "lora experts"}[type(module)]
        add(group_name(module.module_name), kind, params, closed, shape, module.r[ADAPTER])
    for name, p in model.named_parameters():   # base biases trained by bias="all" / "lora_only"
        if p.requires_grad and id(p) not in counted:
            add(group_name(name.replace(".base_layer.", ".")), "bias", {name: p}, p.numel(), "-", None)

    groups = [ModuleGroup(name, kind, row["modules"], next(iter(row["shapes"])) if len(row["shapes"]) == 1 else "various",
                          sorted(row["ranks"]), row["trainable"], row["closed"], row["trainable"] / total, row["bytes"])
              for (name, kind), row in rows.items()]
    peft = inject.get_adapter_config(model, ADAPTER).to_peft_dict()
    peft["inference_mode"] = True   # as io.write_adapter writes it
    config_bytes = len((json.dumps(peft, indent=2, sort_keys=True) + "\n").encode())
    return ParamReport(groups, trainable, total, sum(g.closed_form for g in groups),
                       safetensors_size(io.adapter_state_dict(model, ADAPTER), {"format": "pt"}), config_bytes)


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The exact size of the file `safetensors.torch.save_file` writes, from shapes and dtypes only:
    8 bytes of header length, the JSON header padded to 8 bytes, the data. Offsets follow the
    library's order (by dtype alignment, then name), which decides the header's digits."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, t in items:
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(text) + (-len(text) % 8) + offset


# ---- what the memory model needs ----------------------------------------------------------------


def arch_of(model: nn.Module) -> tuple[Arch, bool]:
    """The model's dimensions, and whether its layers are the ones the activation model counts."""
    c = model.config.get_text_config()
    hidden = c.hidden_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    if c.model_type == "gpt2":
        act = c.activation_function
        return Arch("gpt2", c.num_hidden_layers, hidden, heads, heads, head_dim, c.n_inner or 4 * hidden, c.vocab_size,
                    act_saved=4 if act == "gelu_new" else 1, act_grads=2 if act == "gelu_new" else 1, resid_dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop), True
    intermediate = getattr(c, "intermediate_size", None) or 4 * hidden
    return Arch("llama", c.num_hidden_layers, hidden, heads, kv_heads, head_dim, intermediate, c.vocab_size,
                act_saved=3, act_grads=1, attn_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0)), \
        c.model_type in _EXACT


def trainables_of(model: nn.Module, arch: Arch) -> Trainables:
    """Where the adapter sits, by layer and position, for the activation model."""
    layers: list[dict[str, list]] = [{"qkv": [], "o": [], "up": [], "down": [], "other": [], "experts": []}
                                     for _ in range(arch.layers)]
    embedding, head, head_full, copies = [], [], False, False
    output = _output_head(model)
    for module_name, module in inject.wrappers(model):
        index = _layer_index(module_name)
        if isinstance(module, ModulesToSave):
            head_full = head_full or module.original_module is output
            copies = copies or module.original_module is not output
            continue
        r = module.r[ADAPTER]
        if index is None:
            if isinstance(module, LoraEmbedding):
                embedding.append(r)
            elif module.base_layer is output:
                head.append(r)
            continue
        if isinstance(module, LoraParameter):
            layers[index]["experts"].append(module.num_experts * module.in_features * module.out_features)
            continue
        position = _POSITION.get(group_name(module_name)) or _POSITION.get(module_name.rsplit(".", 1)[-1])
        if position is None:
            layers[index]["other"].append((getattr(module, "in_features", arch.hidden), r))
        else:
            layers[index][position].append(r)
    frozen_base = {id(p) for p in inject.get_state(model).frozen}
    biases = any(p.requires_grad and id(p) in frozen_base for p in model.parameters())
    dropout = any(module.lora_dropout.get(ADAPTER, 0) > 0 for _, module in inject.lora_layers(model))
    return Trainables(tuple(LayerAdapters(**{k: tuple(v) for k, v in d.items()}) for d in layers),
                      tuple(embedding), tuple(head), head_full, biases or copies, dropout)


def _output_head(model: nn.Module) -> nn.Module:
    """The output head as a plain module, whether or not an adapter wraps it."""
    head = model.get_output_embeddings()
    if isinstance(head, LoraLayer):
        return head.base_layer
    return head.original_module if isinstance(head, ModulesToSave) else head


def _layer_index(module_name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else None


def weights_of(model: nn.Module) -> Weights:
    """Counts and bytes of the injected meta model's parameters."""
    frozen = trained = base = quantizable = largest = 0
    head = _output_head(model)
    adapter_params = {id(p) for _, m in inject.wrappers(model) for p in m.adapter_parameters(ADAPTER).values()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            base += p.numel()
        if p.requires_grad:
            trained += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and module is not head and ".lora_" not in name \
                and ".modules_to_save." not in name:
            quantizable += module.weight.numel()
            largest = max(largest, module.weight.numel())
        for stack in expert_parameters(module):   # NF4 too under QLoRA, dequantized a whole stack at a time
            quantizable += getattr(module, stack).numel()
            largest = max(largest, getattr(module, stack).numel())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Weights(frozen + buffers, trained, base, buffers, quantizable, largest)


def model_source(name_or_path: str) -> str:
    """What `from_pretrained` reads for a config's model (the built-in id becomes its directory)."""
    return resolve_model_path(name_or_path)


def tokenizer_dir(source: str) -> Path | None:
    """A local directory holding a tokenizer next to the model config, if there is one."""
    path = Path(source)
    directory = path.parent if path.is_file() else path
    if directory.is_dir() and any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return directory
    return None


def embedding_parameters(model: nn.Module) -> int:
    """Trainable parameters on the input embeddings and the output head (LoRA or full copies)."""
    head = _output_head(model)
    total = 0
    for _, module in inject.wrappers(model):
        base = module.original_module if isinstance(module, ModulesToSave) else module.base_layer
        if (isinstance(base, nn.Embedding) or base is head) and ADAPTER in module.adapter_names:
            total += sum(p.numel() for p in module.adapter_parameters(ADAPTER).values())
    return total
