"""Which models keep the chunked loss: told by what the model does to the head's output, not by its
name. OPT returns `lm_head(h).contiguous()`, a copy with the same values: chunked, one forward, no
warning. Gemma 2 soft-caps and Cohere scales the logits after the head: the plain path, with the
warning, and the same loss as the full logits either way."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_chunked_loss_train import VOCAB, a_batch, assert_same
from tiny_models import tiny_model
from transformers import CohereConfig, CohereForCausalLM, OPTConfig, OPTForCausalLM

import lorakit as lk


def opt(dtype: torch.dtype = torch.float32) -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                       bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(config).to(dtype).train()


def cohere() -> CohereForCausalLM:
    torch.manual_seed(0)
    config = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          logit_scale=0.0625, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return CohereForCausalLM(config).train()


def with_adapter(model):
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def forwards(model) -> list[int]:
    """A growing list: one entry per call of the model's forward. `assert_same` runs the plain path,
    then the chunked one: 2 calls when the chunked loss is kept, 3 when it is run again on the plain
    path."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_opt_contiguous_logits_keep_the_chunked_loss():
    model = with_adapter(opt())
    calls = forwards(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "changes its logits" warning
        assert_same(model, a_batch())
    assert len(calls) == 2                                     # one plain, one chunked: no rerun


def test_opt_in_bf16_keeps_the_chunked_loss():
    """The placeholder's value survives a bf16 copy exactly (it is a power of two)."""
    model = with_adapter(opt(torch.bfloat16))
    calls = forwards(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(model, a_batch(), rtol=2e-2, atol=2e-3)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma2_softcapping_falls_back(dtype):
    """Gemma 2's own cap (30): c tanh(x / c) changes the placeholder even in bf16."""
    model = with_adapter(tiny_model("gemma2", vocab=VOCAB, dtype=dtype, training=True))
    assert model.config.final_logit_softcapping == 30.0
    calls = forwards(model)
    tolerance = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    with pytest.warns(UserWarning, match="Gemma2ForCausalLM changes its logits after the output head"):
        assert_same(model, a_batch(), **tolerance)
    assert len(calls) == 3                                     # plain; chunked attempt, rerun plain


def test_cohere_logit_scale_falls_back():
    model = with_adapter(cohere())
    calls = forwards(model)
    with pytest.warns(UserWarning, match="CohereForCausalLM changes its logits after the output head"):
        assert_same(model, a_batch())
    assert len(calls) == 3
