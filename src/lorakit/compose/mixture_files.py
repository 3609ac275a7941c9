"""The saved form of a mixture of LoRA experts or an AdapterFusion: `save_mixture`, `load_mixture`.

A directory with

    mixture_config.json         {"format": "lorakit-mixture", "format_version": 1, "kind": "moe" | "fusion",
                                 "experts": [names], "config": {MixtureConfig or FusionConfig fields}}
    mixture_model.safetensors   the gate (or fusion) parameters, keys "<module path>.<parameter>",
                                e.g. "model.layers.0.self_attn.q_proj.router.weight"
    <expert>/                   each expert in PEFT format (adapter_config.json + adapter_model.safetensors)

The kind names which composer the file holds; `KINDS` maps it to its config class and to the
function that attaches it, so this module, not the mixture or fusion module, knows both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import NAME_RE, LoraConfig
from ..errors import AdapterFileError, AdapterStateError, ConfigError, few
from ..files import atomic_write, read_safetensors, read_text
from ..inject import delete_adapter, get_state, has_adapters
from ..io import (
    full_adapter_state_dict,
    gather_full,
    load_adapter,
    load_adapter_weights,
    shard_like,
    write_adapter,
)
from ..schema import from_dict
from .fusion import add_fusion
from .mixture import add_mixture, composers, remove_mixture
from .settings import FusionConfig, KindName, MixtureConfig

CONFIG_NAME = "mixture_config.json"
WEIGHTS_NAME = "mixture_model.safetensors"
FORMAT = "lorakit-mixture"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Kind:
    """What a saved kind is made of: its config class, and how to attach it to a model."""

    config: type
    add: Callable[..., nn.Module]
    """(model, experts, config, *, trainable, train_experts) -> model."""


def _add_fusion(model: nn.Module, experts: Sequence[str], config: FusionConfig, *, trainable: bool,
                train_experts: bool) -> nn.Module:
    """Fusion keeps its adapters frozen: `train_experts` does not apply to it."""
    return add_fusion(model, experts, config, trainable=trainable)


KINDS: dict[str, Kind] = dict(zip(get_args(KindName), (Kind(MixtureConfig, add_mixture), Kind(FusionConfig, _add_fusion)),
                                  strict=True))


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
    atomic_write(root / WEIGHTS_NAME, lambda tmp: save_file(files.tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(files.meta, indent=2) + "\n"
    atomic_write(root / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def save_mixture(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's mixture of experts or fusion to directory `path`: mixture_config.json,
    mixture_model.safetensors and each expert in PEFT format in `path/<expert>/`."""
    write_mixture(path, gather_mixture(model))


def read_mixture_config(path: str | os.PathLike) -> tuple[str, list[str], Any]:
    """(kind, experts, MixtureConfig or FusionConfig) of a saved mixture directory, validated."""
    root = Path(path)
    file = root / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a saved mixture directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (written by lorakit.save_mixture)")
    try:
        data = json.loads(read_text(file, AdapterFileError))
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
            or not all(isinstance(e, str) and NAME_RE.fullmatch(e) for e in experts)):
        raise AdapterFileError(f"{file}: experts must be a non-empty list of distinct adapter names, got {experts!r}")
    try:
        config = from_dict(KINDS[kind].config, data.get("config"), "config")
    except ConfigError as e:
        raise AdapterFileError(f"{file}: {e}") from None
    return kind, experts, config


def _copy_composer_weights(model: nn.Module, file: Path) -> None:
    tensors = read_safetensors(file, f"a saved mixture directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    expected = _composer_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {few(missing, 3)}"] if missing else []) + ([f"unexpected {few(unexpected, 3)}"] if unexpected else [])
        raise AdapterFileError(f"{file} does not fit this model's mixture ({'; '.join(parts)}); it was saved from "
                               "another base model or with experts that target other modules")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterFileError(f"{file}: {key} has shape {tuple(tensor.shape)} but this model's mixture expects "
                                   f"{tuple(expected[key].shape)}; it was saved from another base model or config")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(shard_like(tensor, expected[key]))


def load_mixture(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False,
                 train_experts: bool = False) -> nn.Module:
    """Load a saved mixture of experts or fusion (`save_mixture`) into `model`: its experts under
    their saved names, then its gates or fusion layers. In place, returns the model. On any error
    nothing stays loaded. Raises AdapterStateError if the model already has an adapter of an
    expert's name or a mixture, AdapterFileError for files that are corrupt or do not fit."""
    root = Path(path)
    kind, experts, config = read_mixture_config(root)
    if has_adapters(model) and composers(model):
        raise AdapterStateError("this model already has a mixture or fusion; call remove_mixture before loading another")
    loaded: list[str] = []
    attached = False
    try:
        for e in experts:
            load_adapter(model, root / e, name=e, trainable=train_experts, activate=False)
            loaded.append(e)
        KINDS[kind].add(model, experts, config, trainable=trainable, train_experts=train_experts)
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
