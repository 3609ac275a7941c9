"""lorakit: LoRA adapters on any PyTorch / transformers model, in PEFT's format.

    import lorakit as lk
    cfg = lk.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lk.add_adapter(model, cfg)              # in place; freezes the base
    ...train...
    lk.save_adapter(model, "out/")          # adapter_config.json + adapter_model.safetensors
"""

from .compose.combine import combine_adapters
from .compose.fusion import FusionConfig, add_fusion
from .compose.mixture import MixtureConfig, add_mixture, mixture_aux_loss, remove_mixture
from .compose.mixture_files import load_mixture, save_mixture
from .compose.per_sample import StackedAdapters, per_sample_adapters
from .compose.router import FitResult, Router
from .config import LoraConfig
from .errors import AdapterFileError, AdapterStateError, ConfigError, LoraError, TargetModulesError
from .inject import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    get_adapter_config,
    list_adapters,
    merge_adapters,
    set_active_adapters,
    trainable_parameters,
    trainable_summary,
    unload,
    unmerge_adapters,
)
from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraError",
    "ConfigError",
    "TargetModulesError",
    "AdapterStateError",
    "AdapterFileError",
    "add_adapter",
    "load_adapter",
    "save_adapter",
    "read_adapter_config",
    "adapter_state_dict",
    "list_adapters",
    "get_adapter_config",
    "active_adapters",
    "set_active_adapters",
    "disable_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "delete_adapter",
    "unload",
    "trainable_parameters",
    "trainable_summary",
    "combine_adapters",
    "per_sample_adapters",
    "StackedAdapters",
    "Router",
    "FitResult",
    "MixtureConfig",
    "add_mixture",
    "FusionConfig",
    "add_fusion",
    "mixture_aux_loss",
    "remove_mixture",
    "save_mixture",
    "load_mixture",
]
