"""Load the base model and tokenizer for every verb (train, merge, combine, eval, generate, serve,
plan): hub id, local directory, or the built-in tiny model, all through `from_pretrained`; and
turn a prompt or chat messages into the token ids generation starts from."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .builtin.model import BUILTIN_MODEL, builtin_model_dir
from .dtypes import TORCH_DTYPES
from .errors import ConfigError, LoraError
from .quantize import QUANTIZE_BASE, quantize_linears


def resolve_model_path(name_or_path: str) -> str:
    """The built-in id becomes its cached directory; anything else is passed to from_pretrained."""
    return str(builtin_model_dir()) if name_or_path == BUILTIN_MODEL else name_or_path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return TORCH_DTYPES[dtype]


def load_tokenizer(name_or_path: str, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), revision=revision,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:   # batching needs a pad id; it is never trained on
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto", attn_implementation: str = "sdpa",
               revision: str | None = None, trust_remote_code: bool = False,
               quantize_base: str = "none") -> PreTrainedModel:
    """A causal LM on its device, in eval mode. With `quantize_base="nf4"` (QLoRA) every linear
    layer but the output head is a frozen 4-bit NF4 layer computing in `dtype`; it is loaded on
    the CPU and quantized onto the device layer by layer (see `lorakit.quantize`)."""
    if quantize_base not in QUANTIZE_BASE:
        raise ConfigError(f"quantize_base must be one of {', '.join(QUANTIZE_BASE)}, got {quantize_base!r}")
    path = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: it is not a local model directory and the hub did not "
            f"provide it ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    if quantize_base == "nf4" and quantize_linears(model, torch_dtype, dev) == 0:
        raise ConfigError(f"quantize_base=nf4: {name_or_path} has no linear layer besides the output head to quantize")
    return model.to(dev).eval()


def encode_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """The token ids generation starts from: raw text with the tokenizer's special tokens, or chat
    messages through the chat template (which writes its own). `lorakit serve` encodes the same way,
    so a request equals `lorakit generate` with the same adapter."""
    if (prompt is None) == (messages is None):
        raise LoraError("give exactly one of a prompt or chat messages")
    if messages is not None:
        if not tokenizer.chat_template:
            raise LoraError("this tokenizer has no chat template; use --prompt, or a model with a chat template")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids
