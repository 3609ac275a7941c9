"""Put adapters into a model and manage them: find target modules, wrap them, freeze the base,
switch, disable, merge, delete, unload, count parameters.

Every function acts in place on the user's own `nn.Module`, so a transformers model stays a
transformers model (`generate`, `save_pretrained`, checkpointing keep working). The per-model
bookkeeping (each adapter's resolved config, the active set, the parameters lorakit froze)
lives in one attribute, `model._lorakit`.

Target matching is PEFT's, so a config means the same module set in both tools:
  - a string is fullmatched against the full dotted module name (within a time limit:
    `config.match_name`);
  - a list matches a name equal to an entry or ending with "." + entry, then
    `layers_to_transform` / `layers_pattern` filter by layer index;
  - "all-linear" is every nn.Linear / Conv1D except the output head, and (beyond PEFT, whose
    "all-linear" misses them) every fused expert weight of a mixture-of-experts model;
  - `exclude_modules` (same rules) and the `modules_to_save` modules are never targets;
  - `target_parameters` entries match a parameter's full name, or its end after a ".".
Adapted parameters (`lorakit.param_layer`) are resolved into the saved config's
`target_parameters`, so PEFT loads what lorakit trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .base_types import CONV_TYPES, LINEAR_TYPES, expert_parameters
from .config import DEFAULT_TARGET_MODULES, NAME_RE, LoraConfig, match_name
from .errors import AdapterStateError, ConfigError, LoraError, TargetModulesError
from .hf_saving import install_save_pretrained, restore_save_pretrained
from .init_from_base import rewrites_base
from .layers import LoraLayer, ModulesToSave, make_lora_layer
from .ops import recompute
from .param_layer import LoraParameter, owner_of, parameter_chain
from .quantize import dequantize_linears, is_4bit, weight_count
from .state import LoraState, check_known, get_state, lora_layers, wrappers
from .state import get_adapter_config as get_adapter_config  # public here too (lorakit.get_adapter_config)
from .state import has_adapters as has_adapters
from .state import list_adapters as list_adapters
from .tied import refuse_tied_merge, untie, untie_config

BASE_NAME = "__base__"
_SUPPORTED = LINEAR_TYPES + (nn.Embedding,) + CONV_TYPES


def _logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module names as the user sees them: a wrapper stands for the module it wraps, and nothing
    inside a wrapper is listed."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name)
        yield name, module


def _base_module(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraParameter):
        return owner_of(module)
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def _matches_list(name: str, entries: list[str]) -> str | None:
    for entry in entries:
        if name == entry or name.endswith("." + entry):
            return entry
    return None


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    patterns = config.layers_pattern
    if patterns in (None, "", []):
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)     # the first numbered segment
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = match_name("LoraConfig.layers_pattern", pattern, name,
                               full=rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\..*")
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _excluded(config: LoraConfig, name: str) -> bool:
    ex = config.exclude_modules
    if isinstance(ex, str) and match_name("LoraConfig.exclude_modules", ex, name):
        return True
    if isinstance(ex, list) and _matches_list(name, ex):
        return True
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save or [])


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> str | list[str] | None:
    """`target_modules` as it will be matched and saved: the model type's default for None (or
    None, no modules, when `target_parameters` are set), the list of matched module names for
    "all-linear", otherwise as given."""
    targets = config.target_modules
    if targets is None and config.target_parameters:
        return None
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise TargetModulesError(
                f"target_modules is not set and there is no default for model type {model_type!r}; set it, "
                "e.g. target_modules='all-linear' or ['q_proj', 'v_proj']"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in _logical_modules(model)
                 if isinstance(_base_module(m), LINEAR_TYPES) and _base_module(m) is not head
                 and not isinstance(m, ModulesToSave) and not _excluded(config, n) and not _is_router(n, m)]
        return sorted(names)
    return targets


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""What mixture-of-experts models name the linear layers that route tokens (Mixtral before
transformers 5, Qwen2-MoE's shared-expert gate, ...)."""


def _is_router(name: str, module: nn.Module) -> bool:
    """A routing gate: named as one and narrower out than in (d -> experts, or d -> 1), unlike an
    MLP's gate projection (d -> intermediate). all-linear leaves routers frozen (name them in
    target_modules to train them): they decide which experts a token reaches, and the experts were
    trained under that routing."""
    base = _base_module(module)
    if not isinstance(base, nn.Linear) or name.rsplit(".", 1)[-1] not in ROUTER_NAMES:
        return False
    return base.out_features < base.in_features


def _all_linear(config: LoraConfig) -> bool:
    return isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"


def resolve_target_parameters(model: nn.Module, config: LoraConfig) -> list[str] | None:
    """`target_parameters` as saved: as given, plus, for "all-linear", the full name of every fused
    expert weight (`base_types.expert_parameters`) outside `exclude_modules`; None if none."""
    names = list(config.target_parameters or [])
    if _all_linear(config):
        experts = [f"{n}.{p}" for n, m in _logical_modules(model) if n and not _excluded(config, n)
                   and not isinstance(m, ModulesToSave) for p in expert_parameters(_base_module(m))]
        unsupported = [what for what, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias),
                                             (f"init_lora_weights={config.init_lora_weights!r}",
                                              rewrites_base(config.init_lora_weights))) if on]
        if experts and unsupported:   # linears only, as before experts were adapted: loudly
            warnings.warn(f"all-linear leaves out the {len(experts)} fused expert weights of {type(model).__name__}: "
                          f"{', '.join(unsupported)} is not supported on them (nor in PEFT), so the experts do not "
                          "train; switch it off to train them", stacklevel=3)
            experts = []
        names += experts
    return list(dict.fromkeys(names)) or None


def _own_parameters(module: nn.Module) -> list[str]:
    """The parameters a module holds itself, NF4 expert stacks included, in registration order."""
    owner = _base_module(module)
    names = [n for n, _ in owner.named_parameters(recurse=False)]
    return names + [n for n in expert_parameters(owner) if n not in names]


def _find_parameter_targets(model: nn.Module, entries: list[str]) -> list[tuple[str, list[str]]]:
    """(module name, the parameters of it to adapt, in its registration order) for every module
    holding a parameter that `entries` names; an entry that names nothing is an error."""
    found, used = [], set()
    for name, module in _logical_modules(model):
        if not name or isinstance(module, ModulesToSave) or (
                isinstance(module, LoraLayer) and not isinstance(module, LoraParameter)):
            continue
        hits = [p for p in _own_parameters(module) if _matches_list(f"{name}.{p}", entries)]
        used.update(_matches_list(f"{name}.{p}", entries) for p in hits)
        if hits:
            found.append((name, hits))
    missing = [e for e in entries if e not in used]
    if missing:
        stacks = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, m in _logical_modules(model) if n
                         for p in expert_parameters(_base_module(m))})
        raise TargetModulesError(
            f"target_parameters entries {missing} matched no parameter of {type(model).__name__}. Give a "
            "parameter's full name or its end after a '.'" + (
                f"; the fused expert weights here: {', '.join(stacks)}" if stacks else
                "; this model has no fused expert weights (3-D parameters): adapt its layers with target_modules")
        )
    return found


def _adapt_parameters(model: nn.Module, module_name: str, params: list[str]) -> list[LoraParameter]:
    """The `LoraParameter` wrappers of `params` on module `module_name`, outermost first: the
    existing ones, or new ones nested in registration order (the first parameter innermost, as
    PEFT nests them, so the module paths are its file keys). Every adapter on a module must adapt
    the same parameters of it (PEFT's rule: the nesting, and so the keys, depend on the set)."""
    chain = parameter_chain(model.get_submodule(module_name))
    have = [w.parameter_name for w in reversed(chain)]
    if have and have != params:
        raise TargetModulesError(
            f"{module_name}: its adapters adapt the parameters {have}, this one {params}; every adapter on a "
            "module must adapt the same parameters of it (PEFT nests one wrapper per parameter, so the file "
            "keys depend on the set). Adapt the same parameters, or put the adapter on another model copy"
        )
    if chain:
        return chain
    module = model.get_submodule(module_name)
    for p in params:
        module = LoraParameter(module, module_name, p).train(module.training)
    _replace(model, module_name, module)
    return parameter_chain(module)


def _find_targets(model: nn.Module, config: LoraConfig, targets: str | list[str] | None) -> list[tuple[str, nn.Module]]:
    if targets is None:
        return []
    found, used = [], set()
    for name, module in _logical_modules(model):
        if not name or isinstance(module, (ModulesToSave, LoraParameter)) or _excluded(config, name):
            continue
        if isinstance(targets, str):
            hit = match_name("LoraConfig.target_modules", targets, name) is not None
        else:
            entry = _matches_list(name, targets)
            hit = entry is not None and _layer_index_ok(config, name)
            if hit:
                used.add(entry)
        if hit:
            found.append((name, module))
    if not found:
        candidates = sorted({n.rsplit(".", 1)[-1] for n, m in _logical_modules(model)
                             if n and isinstance(_base_module(m), _SUPPORTED)})
        example = next((n for n, m in _logical_modules(model) if n and isinstance(_base_module(m), _SUPPORTED)), None)
        filters = " after exclude_modules / layers_to_transform" if (
            config.exclude_modules or config.layers_to_transform is not None) else ""
        raise TargetModulesError(
            f"target_modules {targets!r} matched no module of {type(model).__name__}{filters}. Modules LoRA can "
            f"adapt: {', '.join(candidates) or '(none)'}" + (f" (full names look like {example!r})" if example else "")
        )
    if isinstance(targets, list):
        missing = [t for t in targets if t not in used]
        if missing:
            warnings.warn(f"target_modules entries {missing} matched no module of {type(model).__name__}", stacklevel=4)
    return found


def check_new_name(model: nn.Module, name: str) -> None:
    """Refuse a name that is not a valid adapter name or is taken on `model`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == BASE_NAME:
        raise AdapterStateError(
            f"adapter name {name!r} is not valid: use letters, digits, '_' and '-' (it names a folder when "
            f"saved), and not {BASE_NAME!r}, which means 'no adapter'"
        )
    state = getattr(model, "_lorakit", None)
    if state is not None and name in state.configs:
        raise AdapterStateError(f"an adapter named {name!r} already exists; pick another name or delete_adapter it first")


def _lorakit_config(config: object) -> LoraConfig:
    """`config` as a lorakit LoraConfig. A PEFT LoraConfig (told by its class's module: lorakit does
    not import PEFT) is read as the adapter_config.json it would save, whose reader refuses, naming
    the field, a PEFT feature lorakit does not compute. That JSON holds the enums' values
    (`peft_type`, `task_type`) where `to_dict()` holds the enums."""
    if isinstance(config, LoraConfig):
        return config
    kind = type(config)
    if kind.__module__.partition(".")[0] == "peft" and callable(getattr(config, "to_dict", None)):
        data = {k: v.value if isinstance(v, enum.Enum) else v for k, v in config.to_dict().items()}
        return LoraConfig.from_peft_dict(data, source=f"peft.{kind.__name__}")
    shown = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise LoraError(f"config must be a lorakit.LoraConfig (or a peft.LoraConfig), got {shown}")


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *, trainable: bool = True,
                activate: bool = True, adapter_dtype: torch.dtype | None = None, initialise: bool = True) -> nn.Module:
    """Add a new adapter to `model` in place and return the model.

    `config` may also be PEFT's LoraConfig: it is converted (`_lorakit_config`), so code written
    for PEFT's `get_peft_model` keeps its config. The first adapter freezes every base parameter.
    The new adapter's parameters (and its `modules_to_save` copies and, per `bias`, base biases)
    train when `trainable`. With `activate` it becomes the only active adapter. Its weights take
    the base layer's dtype unless `adapter_dtype` says otherwise. `initialise=False` is for
    loaders, which overwrite the weights next: an init that rewrites the base (PiSSA, OLoRA) must
    not run then.
    """
    config = _lorakit_config(config)
    check_new_name(model, name)
    targets = resolve_target_modules(model, config)
    found = _find_targets(model, config, targets)
    target_parameters = resolve_target_parameters(model, config)
    param_targets = _find_parameter_targets(model, target_parameters) if target_parameters else []
    save_names = _find_modules_to_save(model, config)
    if param_targets and config.lora_dropout:
        warnings.warn(f"lora_dropout={config.lora_dropout:g} does not apply to the adapted parameters "
                      f"({', '.join(target_parameters[:2])}{', ...' if len(target_parameters) > 2 else ''}): "
                      "an update of a weight cannot drop its input, so they train without dropout (and the "
                      "saved adapter_config.json says lora_dropout 0, which PEFT requires)", stacklevel=2)

    init = config.init_lora_weights if initialise else True
    if rewrites_base(init):
        for module_name, module in found:
            if not isinstance(_base_module(module), LINEAR_TYPES):
                raise ConfigError(f"init_lora_weights={init!r} is for Linear layers; {module_name} is a "
                                  f"{type(_base_module(module)).__name__}: exclude it or use True / 'gaussian'")
            if is_4bit(_base_module(module)):
                raise ConfigError(f"init_lora_weights={init!r} rewrites the base weight, but {module_name} is 4-bit "
                                  "(QLoRA): use True or 'gaussian', or a full-precision base")

    state = getattr(model, "_lorakit", None)
    if state is None:
        state = LoraState()
        for p in model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                state.frozen.append(p)
        state.hooks = recompute.install(model)
        model._lorakit = state

    new_layers: list[LoraLayer] = []
    try:
        for module_name, module in found:
            layer = module if isinstance(module, LoraLayer) else make_lora_layer(module, module_name)
            layer.add_adapter(name, config.rank_for(module_name), config.alpha_for(module_name),
                              config.lora_dropout, init, config.use_rslora, config.use_dora, config.lora_bias,
                              adapter_dtype)
            if layer is not module:
                layer.train(module.training)   # a new wrapper follows the model's train/eval mode
                _replace(model, module_name, layer)
            new_layers.append(layer)
        for module_name, params in param_targets:
            for layer in _adapt_parameters(model, module_name, params):
                layer.add_adapter(name, config.rank_for(layer.module_name), config.alpha_for(layer.module_name),
                                  config.lora_dropout, init, config.use_rslora, config.use_dora, config.lora_bias,
                                  adapter_dtype)
        for module_name in save_names:
            module = model.get_submodule(module_name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, module_name).train(module.training)
                _replace(model, module_name, module)
            module.add_adapter(name)
    except Exception:
        state.configs[name] = config  # so the rollback finds what to remove
        delete_adapter(model, name)
        raise
    if rewrites_base(init):   # only now that every target took the adapter
        for layer in new_layers:
            layer.init_from_base(name, init)

    fan_in_fan_out = any(isinstance(m, LoraLayer) and getattr(m, "fan_in_fan_out", False) for m in new_layers)
    resolved = dataclasses.replace(
        config, target_modules=targets, target_parameters=target_parameters,
        fan_in_fan_out=fan_in_fan_out or config.fan_in_fan_out,
        base_model_name_or_path=config.base_model_name_or_path or model_name(model),
    )
    state.configs[name] = resolved
    set_trainable(model, name, resolved, trainable)
    if activate:
        set_active_adapters(model, [name])
    install_save_pretrained(model)   # model.save_pretrained writes the adapters (lorakit.hf_saving)
    return model


def _find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found, used = [], set()
    for name, module in _logical_modules(model):
        entry = _matches_list(name, config.modules_to_save) if name else None
        if entry is not None and not isinstance(module, LoraLayer):
            found.append(name)
            used.add(entry)
    missing = [m for m in config.modules_to_save if m not in used]
    if missing and not found:
        raise TargetModulesError(f"modules_to_save {config.modules_to_save} matched no module of {type(model).__name__}")
    if missing:
        warnings.warn(f"modules_to_save entries {missing} matched no module of {type(model).__name__}", stacklevel=4)
    return found


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def model_name(model: nn.Module) -> str | None:
    """The id or path the model was loaded from (transformers records it), or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def set_trainable(model: nn.Module, name: str, config: LoraConfig, trainable: bool) -> None:
    """Switch training of adapter `name`'s parameters (and, per `config.bias`, the base biases)."""
    for _, module in wrappers(model):
        if name in module.adapter_names:
            for p in module.adapter_parameters(name).values():
                p.requires_grad_(trainable)
    if not trainable or config.bias == "none":
        return
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias" and ".lora_" not in pname and ".modules_to_save." not in pname:
                p.requires_grad_(True)
    else:  # lora_only: the biases of the layers this adapter adapts
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if name in layer.r and bias is not None:
                bias.requires_grad_(True)


# ---- switching ------------------------------------------------------------------------------


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).active)


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly `names` active (their terms are summed); [] leaves only the base."""
    state = get_state(model)
    names = [names] if isinstance(names, str) else list(names)
    check_known(state, names)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged_adapters}
    dropped = sorted(merged - set(names))
    if dropped:
        raise AdapterStateError(f"adapters {dropped} are merged into the base weights; unmerge_adapters before "
                                "deactivating them")
    state.active = names
    for _, module in wrappers(model):
        module.active_adapters = list(names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base output."""
    get_state(model)
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise AdapterStateError("adapters are merged into the base weights, so the base output cannot be "
                                "recovered exactly; call unmerge_adapters first")
    modules = [m for _, m in wrappers(model)]
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.disabled = was


# ---- merging --------------------------------------------------------------------------------


def merge_adapters(model: nn.Module, names: list[str] | None = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights; reversible with
    `unmerge_adapters`, idempotent. With `safe`, every merged weight is computed and checked for
    NaN/inf before any weight is written."""
    state = get_state(model)
    names = list(state.active) if names is None else ([names] if isinstance(names, str) else list(names))
    check_known(state, names)
    inactive = [n for n in names if n not in state.active]
    if inactive:
        raise AdapterStateError(f"adapters {inactive} are not active; set_active_adapters to include them before merging")
    layers = list(lora_layers(model))
    for _, layer in layers:   # a 4-bit base refuses before anything is merged
        layer.check_mergeable(names)
    refuse_tied_merge(model, layers, names)   # and so does a weight tied to another module's
    if safe:
        for module_name, layer in layers:
            new_w, new_b, _ = layer.merged_weights(names)
            if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
                bad = [n for n in names if n in layer.r and not torch.isfinite(layer.delta_weight(n)).all()]
                raise AdapterStateError(
                    f"merging {bad or names} into {module_name} gives NaN/inf weights; nothing was merged. "
                    "The adapter's weights are broken (check training for divergence)"
                )
    for _, layer in layers:
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (exact up to float rounding)."""
    get_state(model)
    for _, layer in lora_layers(model):
        layer.unmerge()


# ---- removing -------------------------------------------------------------------------------


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`. Wrappers left without adapters are replaced by their base module;
    when the last adapter goes, the model is plain again (as after `unload(merge=False)`)."""
    state = get_state(model)
    check_known(state, [name])
    for module_name, module in list(wrappers(model)):
        if name in getattr(module, "merged_adapters", []):
            raise AdapterStateError(f"adapter {name!r} is merged into {module_name}; unmerge_adapters first")
    for module_name, module in reversed(list(wrappers(model))):   # innermost first: wrappers can nest
        module.delete_adapter(name)
        if not module.adapter_names:
            _replace(model, module_name, module.original_module if isinstance(module, ModulesToSave)
                     else module.base_layer)
    del state.configs[name]
    if name in state.active:
        state.active.remove(name)
    if not state.configs:
        _release(model, state)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the plain model with every wrapper removed. With `merge`, the active adapters (and
    their `modules_to_save` copies) are folded in first; without it, the base comes back.

    A 4-bit (QLoRA) base cannot hold a merge, so with `merge` every 4-bit linear of the model is
    first dequantized to a plain `nn.Linear` (or `Conv1D`) in its original dtype (see lorakit.quantize).

    A merged module whose weight another module shares (tied input embeddings and output head) gets
    its own merged copy, the other keeps the original, and the config says `tie_word_embeddings=False`
    (see lorakit.tied), so the plain model, saved and reloaded, computes what the adapted one did."""
    state = get_state(model)
    if merge:
        if any(layer.quantized() for _, layer in lora_layers(model)):
            dequantize_linears(model)
        merging = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.r for a in state.active)]
        for old, new in untie(model, merging):   # a tied weight: merge into a copy (lorakit.tied)
            if any(old is p for p in state.frozen):
                state.frozen.append(new)
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    for module_name, module in reversed(list(wrappers(model))):   # innermost first: wrappers can nest
        if isinstance(module, ModulesToSave) and merge:
            keep = module.current()
        else:
            keep = _base_module(module)
        _replace(model, module_name, keep)
    if merge:
        untie_config(model)
    _release(model, state)
    return model


def _release(model: nn.Module, state: LoraState) -> None:
    """Make `model` plain again: the parameters lorakit froze train again, and the hooks and the
    attributes lorakit set on it go (its state, and `save_pretrained`: lorakit.hf_saving)."""
    for p in state.frozen:
        p.requires_grad_(True)
    for hook in state.hooks:
        hook.remove()
    restore_save_pretrained(model)
    del model._lorakit


# ---- counting -------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once, a 4-bit weight as the
    weights it stands for (PEFT's numbers)."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += weight_count(p)
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's one-line summary: `trainable params: X || all params: Y || trainable%: Z`."""
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def expert_summary(model: nn.Module) -> str | None:
    """One line on the model's fused expert weights (mixture-of-experts models), or None if it has
    none: how many stacks of how many experts the adapters adapt, or, loudly, that they are left out
    and how to include them (an attention-only LoRA of an MoE model trains a sliver of it)."""
    stacks = [(n, p, m) for n, m in _logical_modules(model) if n for p in expert_parameters(_base_module(m))]
    if not stacks:
        return None
    adapted = [(n, p, m) for n, p, m in stacks if isinstance(m, LoraParameter)
               and any(w.parameter_name == p for w in parameter_chain(m))]
    kinds = ", ".join(sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, p, _ in stacks}))
    if not adapted:
        return (f"warning: the {len(stacks)} fused expert weights ({kinds}) are not adapted, so the experts do not "
                "train; add them with lora.target_parameters (e.g. ['" + kinds.split(", ")[0] + "']) or use "
                "lora.target_modules: all-linear")
    experts = sorted({w.num_experts for _, _, m in adapted for w in parameter_chain(m)})
    left = len(stacks) - len(adapted)
    return (f"expert weights adapted: {len(adapted)} of {len(stacks)} fused stacks ({kinds}) of "
            f"{'/'.join(map(str, experts))} experts, a low-rank update per expert, without dropout"
            + (f"; {left} left out" if left else ""))
