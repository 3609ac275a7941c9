"""Shared fixtures: tiny models built from configs (no hub), seeded."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with GQA (4 heads, 2 KV heads), width 32, vocab 100, in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers), width 32, vocab 100, in eval mode."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
