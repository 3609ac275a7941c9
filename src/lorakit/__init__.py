"""lorakit: LoRA adapters on any PyTorch / transformers model, in PEFT's format.

    import lorakit as lk
    cfg = lk.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lk.add_adapter(model, cfg)              # in place; freezes the base
    ...train...
    lk.save_adapter(model, "out/")          # adapter_config.json + adapter_model.safetensors

The names below are imported on first use (`lorakit.lazy`), so `import lorakit` and the CLI start
without torch.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(["LoraConfig"], ".config"),
    **dict.fromkeys(["LoraError", "ConfigError", "TargetModulesError", "AdapterStateError", "AdapterFileError"],
                    ".errors"),
    **dict.fromkeys(["add_adapter", "list_adapters", "get_adapter_config", "active_adapters", "set_active_adapters",
                     "disable_adapters", "merge_adapters", "unmerge_adapters", "delete_adapter", "unload",
                     "trainable_parameters", "trainable_summary"], ".inject"),
    **dict.fromkeys(["load_adapter", "save_adapter", "read_adapter_config", "adapter_state_dict"], ".io"),
    **dict.fromkeys(["combine_adapters"], ".compose.combine"),
    **dict.fromkeys(["per_sample_adapters", "StackedAdapters"], ".compose.per_sample"),
    **dict.fromkeys(["Router", "FitResult"], ".compose.router"),
    **dict.fromkeys(["MixtureConfig", "FusionConfig"], ".compose.settings"),
    **dict.fromkeys(["add_mixture", "mixture_aux_loss", "remove_mixture"], ".compose.mixture"),
    **dict.fromkeys(["add_fusion"], ".compose.fusion"),
    **dict.fromkeys(["save_mixture", "load_mixture"], ".compose.mixture_files"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
