"""Load the base model and tokenizer for every verb (train, merge, combine, eval, generate, serve,
plan): hub id, local directory, or the built-in tiny model, all through `from_pretrained`; and
turn a prompt or chat messages into the token ids generation starts from."""

from __future__ import annotations

import os
from typing import get_args

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .builtin.model import builtin_model_dir
from .builtin.names import BUILTIN_MODEL
from .dtypes import DtypeName
from .errors import ConfigError, LoraError
from .progress import quiet_library_bars
from .quantize import QUANTIZE_BASE, quantize_linears

TORCH_DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16),
                                                strict=True))
"""Dtype name (`lorakit.dtypes`) -> torch dtype."""


def resolve_model_path(name_or_path: str) -> str:
    """The built-in id becomes its cached directory; anything else is passed to from_pretrained."""
    return str(builtin_model_dir()) if name_or_path == BUILTIN_MODEL else name_or_path


def _check_exists(name_or_path: str, path: str) -> None:
    """Refuse a name that is neither an existing path nor shaped like a hub id (`/data/m`, `./m`,
    `runs/a/b`): it is a local path with a typo, which transformers would report as a malformed
    repo id in a traceback."""
    if os.path.exists(path):
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: it is not a local model directory (the path "
                                "does not exist) and not a hub id (those look like org/name)") from None


def _load_error(what: str, name_or_path: str, path: str, e: Exception) -> Exception:
    """The one-line error for a failed `from_pretrained` of the `what` ("model" or "tokenizer") at
    `path`: a name neither local nor on the hub, or files (local or downloaded) that do not load.
    transformers raises OSError, ValueError (JSONDecodeError, "Unrecognized model") or
    SafetensorError for these, with the reason on the first line."""
    reason = f"{e.__class__.__name__}: {str(e).splitlines()[0]}"
    if isinstance(e, OSError) and not os.path.isdir(path):
        return FileNotFoundError(f"cannot load model {name_or_path!r}: it is not a local model directory and the "
                                 f"hub did not provide it ({reason})")
    return LoraError(f"cannot load model {name_or_path!r}: its files are not a loadable {what} ({reason})")


def _names_attention(e: Exception) -> bool:
    """transformers refused the attention implementation asked for (not supported by the model,
    unknown, or its package missing): its messages name it."""
    text = str(e).lower()
    return "attn_implementation" in text or "attention implementation" in text or "flash" in text


def resolve_device(device: str, source: str = "model.device") -> torch.device:
    """The torch device `device` names ("auto": cuda when there is one). Errors name `source`, the
    config key or command-line flag the user set it with, and are raised here, before any weights
    are read, rather than when the model is moved."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{source} {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"{source} {device!r}: no CUDA device is available here; use cpu, or auto (cuda when "
                              "there is one)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{source} {device!r}: there are {count} CUDA devices here (cuda:0 to cuda:{count - 1})")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return TORCH_DTYPES[dtype]


def load_tokenizer(name_or_path: str, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    _check_exists(name_or_path, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:
        raise _load_error("tokenizer", name_or_path, path, e) from None
    if tokenizer.pad_token_id is None:   # batching needs a pad id; it is never trained on
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto", attn_implementation: str = "auto",
               revision: str | None = None, trust_remote_code: bool = False,
               quantize_base: str = "none") -> PreTrainedModel:
    """A causal LM on its device, in eval mode. With `quantize_base="nf4"` (QLoRA) every linear
    layer but the output head is a frozen 4-bit NF4 layer computing in `dtype`; it is loaded on
    the CPU and quantized onto the device layer by layer (see `lorakit.quantize`).

    `attn_implementation="auto"` passes none, so transformers picks what it would for a plain
    `from_pretrained`: sdpa where the model supports it, else eager (Gemma 2, whose soft-capped
    attention sdpa cannot compute, refuses sdpa when asked for it)."""
    if quantize_base not in QUANTIZE_BASE:
        raise ConfigError(f"quantize_base must be one of {', '.join(QUANTIZE_BASE)}, got {quantize_base!r}")
    path = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    _check_exists(name_or_path, path)
    quiet_library_bars()
    attention = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, revision=revision,
                                                     trust_remote_code=trust_remote_code, **attention)
    except (ValueError, ImportError) as e:
        if attention and _names_attention(e):
            reason = str(e).splitlines()[0].split(". ")[0].rstrip(".")   # transformers' first sentence
            raise ConfigError(f"cannot load model {name_or_path!r} with attn_implementation {attn_implementation!r}: "
                              f"{reason}; use auto (transformers' choice for this model) or eager") from None
        if isinstance(e, ImportError):
            raise
        raise _load_error("model", name_or_path, path, e) from None
    except (OSError, SafetensorError) as e:
        raise _load_error("model", name_or_path, path, e) from None
    if quantize_base == "nf4" and quantize_linears(model, torch_dtype, dev) == 0:
        raise ConfigError(f"quantize_base=nf4: {name_or_path} has no linear layer besides the output head to quantize")
    return model.to(dev).eval()


def join_text_parts(texts: list[str]) -> str:
    """A message content given as text parts (OpenAI's `[{"type": "text", "text": ...}]`), as one
    string: joined with newlines. Training data and `lorakit serve` join them alike, so a model
    trained on parts sees at inference what it was trained on."""
    return "\n".join(texts)


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
