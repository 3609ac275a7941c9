"""Using several adapters together: combining them into one, a different adapter per batch row,
semantic routing over an adapter library, mixtures of LoRA experts, and AdapterFusion.

Each plugs into the adapter wrappers either by writing a new adapter (combine) or through the
`composer` hook of `lorakit.layers.LoraLayer`, which replaces the sum over active adapters."""

from .combine import combine_adapters
from .fusion import FusionConfig, add_fusion
from .mixture import MixtureConfig, add_mixture, mixture_aux_loss, remove_mixture
from .mixture_files import load_mixture, save_mixture
from .per_sample import per_sample_adapters
from .router import FitResult, Router

__all__ = ["combine_adapters", "per_sample_adapters", "Router", "FitResult", "MixtureConfig", "add_mixture", "FusionConfig",
           "add_fusion", "mixture_aux_loss", "remove_mixture", "save_mixture", "load_mixture"]
