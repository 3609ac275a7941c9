"""The suite's one factory of tiny models, built from configs (no hub) and seeded; imported by tests as
`from tiny_models import ...` (a module of its own: `conftest` names a different file in each test
directory).

    tiny_model()                                  # 2-layer Llama, width 32, GQA (4 heads, 2 KV heads), vocab 100
    tiny_model("gpt2")                            # the same sizes as GPT-2 (Conv1D layers, tied head)
    tiny_model(width=64, tokenizer=tok)           # vocab and bos / eos / pad ids from a tokenizer
    tiny_model(seed=1, initializer_range=0.2)     # any other config field, by its transformers name
    tiny_model_dir(path, tok)                     # saved with its tokenizer: the real loading path runs

The same arguments give the same weights: the global RNG is seeded with `seed` right before the
model is built (`seed=None` keeps the caller's RNG stream, for a model built after another one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# arch: (config class, model class); the Llama family names its sizes alike, GPT-2 its own way
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),     # q/k/v projections carry biases
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),        # Conv1D layers (weight stored (d_in, d_out)), biases
}
_LLAMA_NAMES = dict(layers="num_hidden_layers", width="hidden_size", heads="num_attention_heads",
                    kv_heads="num_key_value_heads", intermediate="intermediate_size", vocab="vocab_size",
                    positions="max_position_embeddings", tie="tie_word_embeddings")
_GPT2_NAMES = dict(layers="n_layer", width="n_embd", heads="n_head", intermediate="n_inner", vocab="vocab_size",
                   positions="n_positions", tie="tie_word_embeddings")


def tiny_config(arch: str = "llama", *, layers: int = 2, width: int = 32, heads: int = 4, kv_heads: int | None = None,
                intermediate: int | None = None, vocab: int | None = None, positions: int = 64,
                tie: bool | None = None, tokenizer=None, **overrides) -> PretrainedConfig:
    """The config of `tiny_model` (see there); `overrides` are config fields by their transformers names
    and win over everything else."""
    config_cls, _ = ARCHS[arch]
    gpt2 = arch == "gpt2"
    if gpt2 and kv_heads is not None:
        raise ValueError("GPT-2 has no key-value heads of its own: leave kv_heads unset")
    sizes = dict(layers=layers, width=width, heads=heads, vocab=vocab or 100, positions=positions)
    if not gpt2:   # GPT-2 keeps its own MLP width (4 x width) and has no GQA
        sizes.update(kv_heads=2 if kv_heads is None else kv_heads,
                     intermediate=2 * width if intermediate is None else intermediate)
    elif intermediate is not None:
        sizes["intermediate"] = intermediate
    if tie is not None:
        sizes["tie"] = tie
    names = _GPT2_NAMES if gpt2 else _LLAMA_NAMES
    fields = {names[k]: v for k, v in sizes.items()}
    if arch == "gemma2":   # Gemma 2's default head_dim (256) is not derived from the width
        fields["head_dim"] = width // heads
    # special ids inside the 100-token vocabulary; GPT-2 has no padding id by default
    fields.update(bos_token_id=1, eos_token_id=2, **({} if gpt2 else {"pad_token_id": 0}))
    if tokenizer is not None:   # its vocabulary (unless `vocab` is given) and its special ids
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, vocab_size=vocab or len(tokenizer))
    fields.update(overrides)
    return config_cls(**fields)


def tiny_model(arch: str = "llama", *, seed: int | None = 0, dtype: torch.dtype | None = None,
               training: bool = False, **config) -> PreTrainedModel:
    """A tiny causal LM of `arch` (see ARCHS): 2 layers, width 32, 4 heads (Llama family: 2 KV heads,
    MLP width 2 x width), vocab 100 with bos 1, eos 2 (and pad 0 but for GPT-2), 64 positions; the
    arch's own default for tying the head to the embeddings.

    `config`: tiny_config's arguments (layers, width, heads, kv_heads, intermediate, vocab, positions,
    tie, tokenizer) and any config field by its transformers name. The weights are initialised in fp32
    after `torch.manual_seed(seed)` (none with `seed=None`), then cast to `dtype`. In eval mode unless
    `training`."""
    cfg = tiny_config(arch, **config)
    if seed is not None:
        torch.manual_seed(seed)
    model = ARCHS[arch][1](cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.train(training)


def tiny_model_dir(path: str | Path, tokenizer, **kwargs) -> PreTrainedModel:
    """`tiny_model(tokenizer=tokenizer, **kwargs)` saved with its tokenizer to `path` (a model directory
    that `from_pretrained` and `lorakit train` load); returns the model."""
    model = tiny_model(tokenizer=tokenizer, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The default tiny model: a 2-layer Llama with GQA (4 heads, 2 KV heads), width 32, vocab 100, in
    eval mode; `overrides` as for tiny_model."""
    return tiny_model("llama", seed=seed, **overrides)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers), width 32, vocab 100, in eval mode; `overrides` as for tiny_model."""
    return tiny_model("gpt2", seed=seed, **overrides)
