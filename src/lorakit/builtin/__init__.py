"""The built-in offline defaults: a tiny Llama with a byte-level tokenizer and a small task
dataset, so `lorakit train` runs end to end with no download."""

from .model import BUILTIN_MODEL, build_tokenizer, builtin_model_dir
from .tasks import BUILTIN_DATA, builtin_data_files

__all__ = ["BUILTIN_DATA", "BUILTIN_MODEL", "build_tokenizer", "builtin_data_files", "builtin_model_dir"]
