"""An adapter's tensors under PEFT's file keys, and writing an adapter directory: what saving
needs, below `lorakit.inject`, so that the injector's `save_pretrained` (lorakit.hf_saving) writes
through it. `lorakit.io` builds saving and loading on it; its names are the public ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .config import LoraConfig
from .errors import LoraError
from .files import atomic_write
from .layers import LoraLayer
from .state import get_state, wrappers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys (live parameters, not copies)."""
    state = get_state(model)
    if name not in state.configs:
        raise LoraError(f"no adapter named {name!r}; adapters on this model: {list(state.configs)}")
    config = state.configs[name]
    out: dict[str, torch.Tensor] = {}
    for module_name, module in wrappers(model):
        if name not in module.adapter_names:
            continue
        for suffix, param in module.adapter_parameters(name).items():
            out[f"{PREFIX}{module_name}.{suffix}"] = param
        if isinstance(module, LoraLayer) and config.bias == "lora_only":
            bias = getattr(module.base_layer, "bias", None)
            if bias is not None:
                out[f"{PREFIX}{module_name}.base_layer.bias"] = bias
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias" and ".lora_" not in pname and ".modules_to_save." not in pname:
                out[PREFIX + pname.replace(".original_module.", ".")] = param
    return out


def full_adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Whole CPU copies of adapter `name`'s tensors under PEFT's file keys, ready to write. On a
    model sharded by FSDP2 this is a collective: every process must call it, in the same order."""
    return {k: gather_full(v) for k, v in adapter_state_dict(model, name).items()}


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Write an adapter directory from whole tensors (`full_adapter_state_dict`) and its config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft = config.to_peft_dict()
    peft["inference_mode"] = True
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy of the whole tensor. A DTensor (an FSDP2 shard) is
    all-gathered first, which every process of its mesh must do at the same point."""
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.to("cpu").contiguous().clone()
