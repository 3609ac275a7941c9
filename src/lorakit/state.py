"""What lorakit knows about a model's adapters, and finding them: the `LoraState` each adapted
model carries as `model._lorakit`, and its wrappers.

Below `lorakit.inject` (which puts adapters in and changes this state) so that what only reads
it, such as writing adapter files (`lorakit.adapter_tensors`), needs nothing from the injector.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import LoraConfig
from .errors import AdapterStateError
from .layers import LoraLayer, ModulesToSave


@dataclass
class LoraState:
    """What lorakit knows about a model's adapters (stored as `model._lorakit`)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    """Each adapter's config, with `target_modules` resolved as it is saved."""
    active: list[str] = field(default_factory=list)
    """Adapters whose terms are added, in order."""
    frozen: list[nn.Parameter] = field(default_factory=list)
    """Base parameters lorakit set to requires_grad=False; `unload` gives them back."""
    hooks: list[RemovableHandle] = field(default_factory=list)
    """The forward hooks that let adapters rebuild their inputs in backward (ops.recompute)."""


def has_adapters(model: nn.Module) -> bool:
    """Whether lorakit adapters are on `model` (it then has a `LoraState`)."""
    return getattr(model, "_lorakit", None) is not None


def get_state(model: nn.Module) -> LoraState:
    state = getattr(model, "_lorakit", None)
    if state is None:
        raise AdapterStateError(f"{type(model).__name__} has no lorakit adapters; call lorakit.add_adapter first")
    return state


def wrappers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """Every adapter wrapper with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in wrappers(model):
        if isinstance(module, LoraLayer):
            yield name, module


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added (empty if none)."""
    state = getattr(model, "_lorakit", None)
    return list(state.configs) if state else []


def get_adapter_config(model: nn.Module, name: str = "default") -> LoraConfig:
    """The resolved config of adapter `name` (as it is saved)."""
    state = get_state(model)
    check_known(state, [name])
    return state.configs[name]


def check_known(state: LoraState, names: list[str]) -> None:
    """Refuse names that are not adapters of the model `state` belongs to."""
    for n in names:
        if n not in state.configs:
            raise AdapterStateError(f"no adapter named {n!r}; adapters on this model: {list(state.configs)}")
