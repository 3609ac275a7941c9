"""Using several adapters together: combining them into one, a different adapter per batch row,
semantic routing over an adapter library, mixtures of LoRA experts, and AdapterFusion.

Each plugs into the adapter wrappers either by writing a new adapter (combine) or through the
`composer` hook of `lorakit.layers.LoraLayer`, which replaces the sum over active adapters."""

from ..lazy import lazy_exports

_EXPORTS = {
    "combine_adapters": ".combine", "per_sample_adapters": ".per_sample", "Router": ".router", "FitResult": ".router",
    "MixtureConfig": ".settings", "FusionConfig": ".settings", "add_mixture": ".mixture", "mixture_aux_loss": ".mixture",
    "remove_mixture": ".mixture", "add_fusion": ".fusion", "save_mixture": ".mixture_files",
    "load_mixture": ".mixture_files",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
