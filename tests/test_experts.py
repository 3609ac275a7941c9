"""LoRA on the fused expert weights of mixture-of-experts models (lorakit.param_layer): all-linear
covers them, PEFT's `target_parameters` files load both ways with equal logits, merge / unmerge /
unload are exact, QLoRA stores them in NF4, and what cannot work is refused by name."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen2MoeConfig

import lorakit as lk
from lorakit.errors import AdapterStateError, ConfigError, TargetModulesError
from lorakit.inject import expert_summary
from lorakit.param_layer import LoraParameter
from lorakit.quantize import dequantize_linears, is_nf4_parameter, quantize_experts, quantize_linears

COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16)
CONFIGS = {
    # experts as (E, d_out, d_in): gate_up (4, 128, 64), down (4, 64, 64)
    "mixtral": lambda: MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    # fused experts next to a shared expert made of nn.Linear layers
    "qwen2_moe": lambda: Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                        num_experts=4, num_experts_per_tok=2, **COMMON),
    # experts stored transposed, (E, d_in, d_out) with is_transposed, next to 2-D expert biases
    "gpt_oss": lambda: GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON),
}


def moe(arch: str = "mixtral", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _experts(model, layer=0):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_all_linear_adapts_every_expert_with_the_closed_form_count(arch):
    model = moe(arch)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    cfg = lk.get_adapter_config(model)
    assert cfg.target_parameters == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                     for p in ("gate_up_proj", "down_proj")]
    trainable, _ = lk.trainable_parameters(model)
    experts = sum(w.num_experts * 4 * (w.in_features + w.out_features)
                  for m in model.modules() if isinstance(m, LoraParameter) for w in [m])
    linears = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".experts." not in n)
    assert experts == 2 * 4 * 4 * ((64 + 128) + (64 + 64))       # layers x experts x r x (d_in + d_out), both stacks
    assert trainable == experts + linears
    mlp = model.model.layers[0].mlp
    router = mlp.router if hasattr(mlp, "router") else mlp.gate
    assert not any(p.requires_grad for p in router.parameters())   # the router stays frozen
    assert "expert weights adapted: 4 of 4 fused stacks" in expert_summary(model)


def test_experts_left_out_are_reported_loudly():
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert expert_summary(model) == (
        "warning: the 4 fused expert weights (experts.down_proj, experts.gate_up_proj) are not adapted, so the "
        "experts do not train; add them with lora.target_parameters (e.g. ['experts.down_proj']) or use "
        "lora.target_modules: all-linear")
    assert expert_summary(moe().model.layers[0].self_attn) is None   # no experts, no line


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_lorakit_adapter_loads_in_peft_with_the_same_logits(arch, ids, tmp_path):
    model = moe(arch)
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    base_model = moe(arch)
    ours = model(ids).logits
    assert (ours - base_model(ids).logits).abs().max() > 1e-2      # the expert updates do change the output
    lk.save_adapter(model, tmp_path)
    peft = PeftModel.from_pretrained(base_model, tmp_path)
    torch.testing.assert_close(peft(ids).logits, ours, rtol=0, atol=1e-5)


def test_peft_target_parameters_load_in_lorakit_with_the_same_logits(ids, tmp_path):
    config = PeftLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, rank_pattern={"down_proj": 3},
                            target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT's spurious "rank_pattern keys did not match" for parameters
        peft = get_peft_model(moe(), config)
    peft.save_pretrained(tmp_path)
    model = lk.load_adapter(moe(), tmp_path)
    torch.testing.assert_close(model(ids).logits, peft(ids).logits, rtol=0, atol=1e-5)
    assert _experts(model).lora_A["default"].weight.shape == (3 * 4, 64)     # down_proj, r=3 by rank_pattern
    assert _experts(model).base_layer.lora_A["default"].weight.shape == (2 * 4, 64)


def test_file_keys_nest_like_peft(tmp_path):
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    keys = sorted(lk.io.adapter_state_dict(model))
    assert keys[:4] == [
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight",   # gate_up_proj: registered first
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight",
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight",              # down_proj
        "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
    ]
    assert lk.get_adapter_config(model).target_modules is None                  # parameters only, as in PEFT


def test_merge_unmerge_and_unload_are_exact(ids):
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    original = _experts(model).base_layer.base_layer.gate_up_proj.detach().clone()
    adapted = model(ids).logits
    lk.merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)
    lk.unmerge_adapters(model)
    torch.testing.assert_close(_experts(model).base_layer.base_layer.gate_up_proj, original, rtol=0, atol=1e-6)
    plain = lk.unload(model, merge=True)
    assert type(_experts(plain)).__name__ == "MixtralExperts"
    assert not any(isinstance(m, LoraParameter) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=1e-5)


def test_delete_adapter_gives_the_plain_experts_back(ids):
    model = moe()
    before = model(ids).logits
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    lk.delete_adapter(model, "default")
    assert type(_experts(model)).__name__ == "MixtralExperts"
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_expert_factors_train(ids):
    model = moe().train()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_parameters=["experts.gate_up_proj"], init_lora_weights="gaussian"))
    start = model(ids).logits                      # B = 0: the base model exactly
    with lk.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, start, rtol=0, atol=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert _experts(model).lora_B["default"].weight.abs().sum() > 0


def test_dropout_is_not_applied_to_parameters_and_the_file_says_so(tmp_path):
    model = moe()
    with pytest.warns(UserWarning, match=r"lora_dropout=0.1 does not apply to the adapted parameters"):
        lk.add_adapter(model, lk.LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    assert _experts(model).lora_dropout["default"] == 0.0
    assert model.model.layers[0].self_attn.q_proj.lora_dropout["default"] == 0.1
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    PeftModel.from_pretrained(moe(), tmp_path)     # PEFT refuses dropout next to target_parameters


def test_targeting_the_experts_module_points_to_target_parameters():
    with pytest.raises(TargetModulesError, match=r"whose experts are fused 3-D weights \(gate_up_proj, down_proj\), not "
                                                 r"layers: adapt them with target_parameters, e.g. "
                                                 r"\['experts.gate_up_proj', 'experts.down_proj'\]"):
        lk.add_adapter(moe(), lk.LoraConfig(target_modules=["experts"]))


def test_a_parameter_name_that_matches_nothing_lists_the_expert_weights():
    with pytest.raises(TargetModulesError) as e:
        lk.add_adapter(moe(), lk.LoraConfig(target_parameters=["experts.up_proj"]))
    assert str(e.value) == ("target_parameters entries ['experts.up_proj'] matched no parameter of MixtralForCausalLM. "
                            "Give a parameter's full name or its end after a '.'; the fused expert weights here: "
                            "experts.down_proj, experts.gate_up_proj")


def test_adapters_on_one_module_must_adapt_the_same_parameters():
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(target_parameters=["experts.gate_up_proj"]))
    with pytest.raises(TargetModulesError, match=r"its adapters adapt the parameters \['gate_up_proj'\], this one "
                                                 r"\['gate_up_proj', 'down_proj'\]"):
        lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"), name="b")
    assert lk.list_adapters(model) == ["default"]                 # the failed add left nothing behind
    lk.add_adapter(model, lk.LoraConfig(target_parameters=["experts.gate_up_proj"]), name="c")
    assert sorted(_experts(model).lora_A) == ["c", "default"]


@pytest.mark.parametrize("option, message", [
    ({"use_dora": True}, "use_dora=True is not supported on the parameter model.layers.0.mlp.experts.gate_up_proj"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is for Linear layers; the parameter "
                                     "model.layers.0.mlp.experts.gate_up_proj supports True, 'gaussian' or False"),
])
def test_what_parameters_cannot_do_is_refused(option, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lk.add_adapter(moe(), lk.LoraConfig(target_parameters=["experts.gate_up_proj"], **option))


def test_per_sample_and_combine_refuse_expert_adapters(ids):
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"), name="a")
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"), name="b")
    with pytest.raises(AdapterStateError, match="per_sample_adapters does not support adapted parameters"):
        with lk.per_sample_adapters(model, ["a", "b"]):
            pass
    with pytest.raises(AdapterStateError, match="adapts parameters .* whose per-expert factors combine_adapters"):
        lk.combine_adapters(model, ["a", "b"], weights=[0.5, 0.5], method="linear", name="ab")


def test_per_sample_leaves_an_expert_adapter_out_of_rows_that_do_not_use_it(ids):
    model = moe()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name="attn")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), name="moe")
    lk.set_active_adapters(model, ["attn"])
    alone = model(ids).logits
    with lk.per_sample_adapters(model, ["attn", "attn"]):
        torch.testing.assert_close(model(ids).logits, alone, rtol=0, atol=1e-5)


# ---- QLoRA ---------------------------------------------------------------------------------


def test_qlora_stores_the_experts_in_nf4_and_trains_adapters_on_them(ids):
    pytest.importorskip("bitsandbytes")
    model = moe()
    full_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    quantized = quantize_linears(model, torch.float32, "cpu")
    assert quantized == 2 * 4 + 2 * 2                               # q, k, v, o per layer, and both expert stacks
    experts = _experts(model)
    assert is_nf4_parameter(experts, "gate_up_proj") and is_nf4_parameter(experts, "down_proj")
    packed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert packed == full_bytes // 8                                  # 4 bits for 32 (the absmaxes aside)
    _, total = lk.trainable_parameters(model)
    assert total == sum(p.numel() for p in moe().parameters())     # an NF4 stack counts the weights it holds
    dense = moe()
    err = (experts.gate_up_proj - dense.model.layers[0].mlp.experts.gate_up_proj).abs().max()
    assert 0 < err < 0.2 * dense.model.layers[0].mlp.experts.gate_up_proj.abs().max()   # an NF4 step, not more

    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert "expert weights adapted: 4 of 4" in expert_summary(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert _experts(model).lora_A["default"].weight.grad is not None
    model.eval()
    adapted = model(ids).logits
    with pytest.raises(AdapterStateError, match="cannot merge into the 4-bit NF4 weight"):
        lk.merge_adapters(model)
    plain = lk.unload(model, merge=True)
    assert not is_nf4_parameter(_experts(plain), "gate_up_proj")
    assert _experts(plain).gate_up_proj.dtype == torch.float32
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=1e-4)


def test_dequantize_gives_plain_expert_parameters_back(ids):
    pytest.importorskip("bitsandbytes")
    model = moe()
    quantize_linears(model, torch.float32, "cpu")
    quantized = model(ids).logits
    assert dequantize_linears(model) == 12
    assert isinstance(_experts(model).gate_up_proj, torch.nn.Parameter)
    torch.testing.assert_close(model(ids).logits, quantized, rtol=0, atol=1e-5)


def test_all_linear_with_what_experts_cannot_take_adapts_the_linears_and_says_so():
    model = moe()
    with pytest.warns(UserWarning, match=r"all-linear leaves out the 4 fused expert weights of MixtralForCausalLM: "
                                         r"use_dora is not supported on them \(nor in PEFT\), so the experts do not "
                                         r"train; switch it off to train them"):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    assert lk.get_adapter_config(model).target_parameters is None
    assert not any(isinstance(m, LoraParameter) for m in model.modules())
    assert expert_summary(model).startswith("warning: the 4 fused expert weights")


def test_all_linear_leaves_routing_gates_frozen():
    """Qwen2-MoE's shared-expert gate is an nn.Linear(d, 1): a router, not an MLP projection."""
    model = moe("qwen2_moe")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    targets = lk.get_adapter_config(model).target_modules
    assert not any(t.endswith("shared_expert_gate") for t in targets)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in targets       # the MLP's gate projection is adapted
    lk.add_adapter(model, lk.LoraConfig(r=1, target_modules=["shared_expert_gate"]), name="gates")   # named: trained
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, lk.layers.LoraLinear)


def test_qlora_unload_dequantizes_when_only_experts_are_adapted(ids):
    pytest.importorskip("bitsandbytes")
    model = moe()
    quantize_linears(model, torch.float32, "cpu")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_parameters=["experts.gate_up_proj"], init_lora_weights=False))
    adapted = model(ids).logits
    plain = lk.unload(model, merge=True)
    assert not is_nf4_parameter(_experts(plain), "gate_up_proj") and not is_nf4_parameter(_experts(plain), "down_proj")
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=1e-4)


def test_nf4_expert_scales_move_with_the_model():
    pytest.importorskip("bitsandbytes")
    model = moe()
    quantize_experts(model, torch.float32, "cpu")        # the stacks only: bitsandbytes' Linear4bit cannot go to meta
    experts = _experts(model)
    model.to("meta")
    chain = experts.parametrizations["gate_up_proj"]
    assert chain.original.device.type == "meta" and chain[0].quant_state.absmax.device.type == "meta"
