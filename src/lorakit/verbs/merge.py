"""`lorakit merge`: a base model with an adapter folded in, written as a plain Hugging Face model
directory (config, sharded safetensors, tokenizer, generation config) that
`AutoModelForCausalLM.from_pretrained` loads with no lorakit installed. An adapter on one of a tied
pair (input embeddings and output head) leaves the pair untied, each with its own weight and
`tie_word_embeddings: false` in the config (`lorakit.unload`, lorakit.tied)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from ..errors import LoraError
from ..files import atomic_dir
from ..inject import unload
from ..io import base_model_of, load_adapter
from ..model_io import TORCH_DTYPES, load_model, load_tokenizer
from ..quantize import dequantize_linears


def merge_to_model_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
                       base: str | None = None, max_shard_size: str | int = "2GB",
                       quantize_base: str | None = None, attn_implementation: str = "auto") -> Path:
    """Merge the adapter in `adapter_dir` into its base (from the adapter config, or `base`) in
    fp32, cast to `dtype` (default: the base's own), and write `out_dir` atomically.

    With `quantize_base="nf4"` (QLoRA) the base is first quantized to NF4 as in training and
    dequantized, so the merged model computes what the trained 4-bit model with its adapter did
    (merging into the original weights instead would add the quantization error back). None
    takes `model.quantize_base` from `config.yaml` when `adapter_dir` is a `lorakit train` run
    directory, and "none" otherwise."""
    base = base or base_model_of(adapter_dir)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise LoraError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise LoraError(f"{out} exists and is not empty; remove it or choose another --out")
    model = load_model(base, dtype="fp32", device="cpu", quantize_base=quantize_base or _run_quantize_base(adapter_dir),
                       attn_implementation=attn_implementation)
    original_dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else None
    load_adapter(model, adapter_dir)
    model = unload(model, merge=True)
    dequantize_linears(model)   # 4-bit layers the adapter did not target (unload dequantized the others)
    target_dtype = TORCH_DTYPES[dtype] if dtype else (original_dtype or torch.float32)
    model.to(target_dtype)
    has_tokenizer = any((Path(adapter_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base)

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out


def _run_quantize_base(adapter_dir: str | os.PathLike) -> str:
    """How the run that wrote `adapter_dir` loaded its base (`model.quantize_base` of the run's
    resolved `config.yaml`); "none" for an adapter directory that is not a run directory."""
    file = Path(adapter_dir) / "config.yaml"
    if not file.is_file():
        return "none"
    data = yaml.safe_load(file.read_text())
    model = data.get("model") if isinstance(data, dict) else None
    return str(model.get("quantize_base", "none")) if isinstance(model, dict) else "none"
