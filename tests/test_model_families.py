"""Every model family the README's "Supported models" section lists, built from its transformers
config: an all-linear adapter (experts included) changes the output, PEFT loads the saved file with
the same logits, merging (with a tied head untied) gives the adapted model's logits, and every
trainable factor gets a gradient. The numbered #15 fixes have their own tests (test_experts,
test_tied_merge, test_save_pretrained, train/test_tool_calls, train/test_real_chat_templates)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

import lorakit as lk
from lorakit.param_layer import LoraParameter

V = 64
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(LLAMA_LIKE, head_dim=8)
# model_type: config fields (transformers' names); the README's "Supported models" table lists these
FAMILIES = {
    "llama": dict(LLAMA_LIKE, tie_word_embeddings=True),      # a tied head, as Llama 3.2 1B / SmolLM2
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": dict(LLAMA_LIKE, head_dim=8),
    "gemma": dict(LLAMA_LIKE, head_dim=8),
    "gemma2": dict(LLAMA_LIKE, head_dim=8),
    "gemma3_text": dict(LLAMA_LIKE, head_dim=8),
    "phi3": dict(LLAMA_LIKE, pad_token_id=0),
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
    "opt": dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "falcon": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "mixtral": dict(MOE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2),
    "qwen3_moe": dict(MOE, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(MOE, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(MOE, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=None),
    "deepseek_v3": dict(MOE, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4),
}
FUSED_EXPERTS = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe", "deepseek_v3"}
# PEFT 0.21.2 rewrites, for DeepSeek V3, a config naming `gate_proj` / `up_proj` as if they were
# transformers 4's per-expert layers (into `gate_up_proj` with twice the rank), though here they are
# the shared experts' real Linear layers: it then builds the wrong shapes and cannot load the file
PEFT_MISREADS = {"deepseek_v3"}


def build(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_adapts_trains_merges_and_loads_in_peft(model_type, tmp_path):
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(1))
    model = build(model_type)
    base = model(ids).logits
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    assert any(isinstance(m, LoraParameter) for m in model.modules()) == (model_type in FUSED_EXPERTS)
    adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-3

    model.train()
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    model.eval()

    lk.save_adapter(model, tmp_path)
    loader = (lambda m: lk.load_adapter(m, tmp_path)) if model_type in PEFT_MISREADS else \
        (lambda m: PeftModel.from_pretrained(m, tmp_path))
    torch.testing.assert_close(loader(build(model_type))(ids).logits, adapted, rtol=0, atol=1e-4)

    merged = lk.unload(model, merge=True)
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="PEFT 0.21.2 remaps DeepSeek V3's shared-expert gate_proj / up_proj onto the "
                                       "fused experts (see PEFT_MISREADS)")
def test_peft_loads_a_deepseek_v3_adapter_of_its_shared_experts(tmp_path):
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(1))
    model = build("deepseek_v3")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["gate_proj", "up_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT warns of the keys it then leaves unloaded
        peft = PeftModel.from_pretrained(build("deepseek_v3"), tmp_path)
    torch.testing.assert_close(peft(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
