"""Save and load adapters in PEFT's format, so they move freely between lorakit, PEFT, vLLM and
llama.cpp.

A saved adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`
(metadata {"format": "pt"}). Tensor keys are `base_model.model.<module path>.<suffix>` with the
adapter name removed: `lora_A.weight`, `lora_B.weight`, `lora_B.bias`, `lora_embedding_A`,
`lora_embedding_B`, `lora_magnitude_vector`; `modules_to_save` copies under the module's own
parameter names; trainable base biases (`bias="all"|"lora_only"`) under their model names.
Several adapters: `default` at the root, every other one in `<dir>/<name>/`.

Loading is strict where PEFT is lenient: a missing or unexpected key, or a shape that does not fit,
is an error naming the module and both shapes, and nothing stays half-loaded. A tensor that is not
floating point (it would be cast silently) or holds NaN / inf (every logit would turn non-finite)
is refused too, the latter unless the caller passes `allow_nonfinite=True`. Nothing is ever
unpickled; files are written to a temporary name and renamed into place.

A model sharded by FSDP2 holds its parameters as DTensors, each process one shard. Saving gathers
the whole tensors (a collective: every process calls `full_adapter_state_dict`, one writes them
with `write_adapter`); loading gives each process its shard of the whole tensor read from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .adapter_tensors import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_state_dict,
    full_adapter_state_dict,
    gather_full,
    write_adapter,
)
from .config import LoraConfig
from .errors import AdapterFileError, LoraError, few
from .files import read_safetensors, read_text
from .inject import add_adapter, delete_adapter, get_state, lora_layers
from .layers import LoraEmbedding

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_state_dict", "full_adapter_state_dict", "gather_full",
           "write_adapter", "save_adapter", "read_adapter_config", "read_adapter_weights", "load_adapter",
           "load_adapter_weights", "base_model_of", "shard_like"]

PICKLE_NAME = "adapter_model.bin"


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | list[str] | None = None) -> None:
    """Write adapters in PEFT's format. One name: that adapter at the root of `path`. A list, or
    None for all: `default` (or the only one) at the root and each other adapter in `path/<name>/`."""
    state = get_state(model)
    names = list(state.configs) if name is None else ([name] if isinstance(name, str) else list(name))
    for n in names:
        if n not in state.configs:
            raise LoraError(f"no adapter named {n!r} to save; adapters on this model: {list(state.configs)}")
    root = Path(path)
    for n in names:
        at_root = len(names) == 1 or n == "default"
        _save_one(model, n, root if at_root else root / n)


def _save_one(model: nn.Module, name: str, directory: Path) -> None:
    write_adapter(directory, full_adapter_state_dict(model, name), get_state(model).configs[name])


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` on `like`'s device and dtype, and, when `like` is a DTensor, cut into this process's
    shard by `like`'s mesh and placements. Every process holds the same `full` (read from the same
    file), so each keeps its own piece and nothing is sent (`src_data_rank=None`)."""
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` of a saved adapter directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(read_text(file, AdapterFileError))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise AdapterFileError(f"{file}: JSON nested too deeply to read; an adapter config is a flat "
                               "object of PEFT's LoRA fields") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return LoraConfig.from_peft_dict(data, source=str(file))


def base_model_of(path: str | os.PathLike, flag: str = "--base") -> str:
    """The base model a saved adapter names (`base_model_name_or_path`), or an error saying which
    command-line `flag` gives it instead."""
    base = read_adapter_config(path).base_model_name_or_path
    if not base:
        raise LoraError(f"{path}/adapter_config.json names no base_model_name_or_path; pass {flag} MODEL")
    return base


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter directory, read from safetensors only."""
    directory = Path(path)
    file = directory / WEIGHTS_NAME
    if not file.is_file() and (directory / PICKLE_NAME).is_file():
        raise AdapterFileError(
            f"{directory / PICKLE_NAME} is a pickle, which lorakit never loads (unpickling can run code). "
            f"Convert it once with PEFT: PeftModel.from_pretrained(base, '{directory}')"
            ".save_pretrained(out_dir, safe_serialization=True)"
        )
    return read_safetensors(file, f"an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False,
                 activate: bool = True, adapter_dtype: torch.dtype | None = None,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT-format adapter directory into `model` as adapter `name` (in place; returns the
    model). Keys and shapes must fit exactly and tensors be floating point and, unless
    `allow_nonfinite` (to inspect a diverged run), free of NaN / inf; otherwise nothing is left
    loaded."""
    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    source = Path(path) / WEIGHTS_NAME
    add_adapter(model, config, name, trainable=trainable, activate=activate, adapter_dtype=adapter_dtype,
                initialise=False)
    try:
        _copy_into(model, name, tensors, source, allow_nonfinite)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model


def load_adapter_weights(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                         allow_nonfinite: bool = False) -> None:
    """Copy a saved adapter's tensors into the existing adapter `name` (e.g. to resume training);
    keys and shapes must fit exactly, as for `load_adapter`."""
    _copy_into(model, name, read_adapter_weights(path), Path(path) / WEIGHTS_NAME, allow_nonfinite)


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path,
               allow_nonfinite: bool) -> None:
    expected = adapter_state_dict(model, name)
    # PEFT also saves the base weight of targeted embeddings (for resized vocabularies); those
    # load into the base layer.
    extra = _embedding_base_weights(model, name)
    unexpected = sorted(k for k in tensors if k not in expected and k not in extra)
    missing = sorted(k for k in expected if k not in tensors)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys the adapter config implies ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys that match nothing in the model ({few(unexpected)})")
        hint = "" if any(k.startswith(PREFIX) for k in tensors) else \
            f"; keys must start with {PREFIX!r} as PEFT writes them"
        raise AdapterFileError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + hint)
    for key, tensor in tensors.items():
        target = expected.get(key, extra.get(key))
        if tuple(tensor.shape) != tuple(target.shape):
            module = key[len(PREFIX):].rsplit(".", 2 if key.endswith(".weight") or key.endswith(".bias") else 1)[0]
            raise AdapterFileError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but module {module} expects "
                f"{tuple(target.shape)}; the adapter was made for another model or rank"
            )
        if not tensor.is_floating_point():
            raise AdapterFileError(
                f"{source}: {key} has dtype {tensor.dtype}, but adapter weights are floating point "
                f"({target.dtype} here) and would be cast silently; save the adapter in float32, float16 or bfloat16"
            )
        if not allow_nonfinite and not torch.isfinite(tensor).all():
            raise AdapterFileError(
                f"{source}: {key} holds NaN or inf, which would make every output non-finite (the run that "
                "saved it diverged?); use an earlier checkpoint, or pass allow_nonfinite=True to load it anyway"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = expected.get(key, extra.get(key))
            target.copy_(shard_like(tensor, target))


def _embedding_base_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{module_name}.base_layer.weight": layer.base_layer.weight
            for module_name, layer in lora_layers(model)
            if isinstance(layer, LoraEmbedding) and name in layer.r}
