"""The built-in offline defaults: a tiny Llama with a byte-level tokenizer and a small task
dataset, so `lorakit train` runs end to end with no download."""

from ..lazy import lazy_exports

_EXPORTS = {"BUILTIN_MODEL": ".names", "BUILTIN_DATA": ".names", "build_tokenizer": ".model",
            "builtin_model_dir": ".model", "builtin_data_files": ".tasks"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
