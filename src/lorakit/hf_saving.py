"""`model.save_pretrained` on a model with lorakit adapters writes the adapters in PEFT's format,
as `peft.PeftModel.save_pretrained` does, instead of a full checkpoint that reloads as random
weights.

transformers' own `save_pretrained` writes the state dict under the wrapped module paths
(`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`), which `from_pretrained` does
not know: it reports them missing and initialises every adapted weight at random. HF `Trainer`
(and TRL's trainers, built on it) write every checkpoint through
`model.save_pretrained(output_dir, state_dict=..., is_main_process=...)`, so their checkpoints
had the same defect. Now each `checkpoint-N/` is an adapter directory (`adapter_config.json`,
`adapter_model.safetensors`) that `lorakit.load_adapter` and `peft.PeftModel.from_pretrained` read,
as with a PEFT model. A merged, plain model is saved with `lorakit.unload(model, merge=True)` first.

What Trainer cannot do with such a checkpoint, for a model that is not a `peft.PeftModel` (it
tells the two apart with `isinstance`): `resume_from_checkpoint` looks for a full model there and
raises "Can't find a checkpoint index", and `load_best_model_at_end` fails at the end of training
looking for `pytorch_model.bin`. Load the adapter of the checkpoint you want with
`lorakit.load_adapter` instead.

How it is set: `add_adapter` makes `save_pretrained` an instance attribute of the model, a method
bound to it (so `copy.deepcopy` rebinds it to the copy), and `unload` or deleting the last adapter
takes it away again; the class and its other instances are untouched. lorakit.patching's rules
hold: a `save_pretrained` that someone else set on the instance is left as it is (with a
warning), and only ours is removed.

It writes through `lorakit.adapter_tensors` and reads the adapters' state from `lorakit.state`,
both below `lorakit.inject`, which installs it.
"""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_tensors import adapter_state_dict, full_adapter_state_dict, gather_full, write_adapter
from .errors import LoraError
from .state import get_adapter_config, list_adapters

# options of a full-model save (transformers) or of PEFT's that an adapter directory has no use for
_NOT_FOR_ADAPTERS = frozenset({"max_shard_size", "variant", "token", "save_peft_format", "save_original_format",
                               "save_embedding_layers"})


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None, selected_adapters: str | list[str] | None = None,
                    safe_serialization: bool = True, push_to_hub: bool = False, **kwargs: Any) -> None:
    """Write `model`'s adapters (`selected_adapters`, default all) to `save_directory` in PEFT's
    layout, as `lorakit.save_adapter` does: `default` (or the only one) at the root, each other in
    `save_directory/<name>/`.

    `state_dict` (Trainer passes the model's full state dict under DeepSpeed and FSDP, where the
    live parameters are shards) is where the adapter tensors are read from, under the model's
    own parameter names; without it they are read from the model. Every process calls this, only
    the one with `is_main_process` writes."""
    if push_to_hub:
        raise LoraError("save_pretrained(push_to_hub=True): lorakit writes the adapter directory only; save it "
                        "here and upload the folder with huggingface_hub.upload_folder")
    if not safe_serialization:
        raise LoraError("save_pretrained(safe_serialization=False): lorakit writes adapters as safetensors only "
                        "(it never pickles); leave safe_serialization at True")
    unknown = sorted(set(kwargs) - _NOT_FOR_ADAPTERS)
    if unknown:
        warnings.warn(f"save_pretrained of a model with lorakit adapters ignores {unknown}: it writes the adapters "
                      "only (adapter_config.json, adapter_model.safetensors)", stacklevel=2)
    if selected_adapters is None:
        names = list_adapters(model)
    else:
        names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
    configs = {n: get_adapter_config(model, n) for n in names}   # unknown names fail before writing
    root = Path(save_directory)
    for name in names:
        tensors = (_from_state_dict(model, name, state_dict) if state_dict is not None
                   else full_adapter_state_dict(model, name))
        if is_main_process:   # the layout of lorakit.save_adapter
            write_adapter(root if len(names) == 1 or name == "default" else root / name, tensors,
                                     configs[name])


def _from_state_dict(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys, taken from `state_dict` (keyed by the model's
    parameter names), as whole CPU copies."""
    model_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for key, param in adapter_state_dict(model, name).items():
        pname = model_name[id(param)]
        if pname not in state_dict:
            raise LoraError(f"the state_dict given to save_pretrained has no {pname} (adapter {name!r}); pass the "
                            "model's full state dict, or none to read the adapter from the model")
        out[key] = gather_full(state_dict[pname])
    return out


def _is_ours(model: nn.Module, attribute: object) -> bool:
    return (isinstance(attribute, types.MethodType) and attribute.__func__ is save_pretrained
            and attribute.__self__ is model)


def install_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` write its adapters (see the module docstring); for a model
    whose class has a `save_pretrained` (a transformers model), and once."""
    current = vars(model).get("save_pretrained")
    if _is_ours(model, current) or not callable(getattr(type(model), "save_pretrained", None)):
        return
    if current is not None:
        warnings.warn(f"{type(model).__name__}.save_pretrained is already replaced on this instance; lorakit leaves "
                      "it, so it may not write the adapters: save them with lorakit.save_adapter", stacklevel=3)
        return
    model.save_pretrained = types.MethodType(save_pretrained, model)


def restore_save_pretrained(model: nn.Module) -> None:
    """Give `model` its class's `save_pretrained` back, if the one on the instance is still ours."""
    if _is_ours(model, vars(model).get("save_pretrained")):
        del model.save_pretrained
