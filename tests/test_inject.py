import re
import warnings

import pytest
import torch
from adapter_support import perturb
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit as lk
from lorakit.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


# ---- matching --------------------------------------------------------------------------------


def test_list_targets_match_by_dotted_suffix(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert adapted(llama) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]


def test_list_entry_must_be_dot_bounded(llama):
    with pytest.raises(lk.TargetModulesError):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["proj"]))


def test_string_target_is_a_fullmatch_regex(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj"))
    assert adapted(llama) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_all_linear_skips_the_output_head(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules="all-linear"))
    names = adapted(llama)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert lk.get_adapter_config(llama).target_modules == names   # saved as the resolved list


def test_all_linear_on_gpt2_takes_conv1d(gpt2):
    lk.add_adapter(gpt2, lk.LoraConfig(target_modules="all-linear"))
    assert adapted(gpt2) == [f"transformer.h.{i}.{m}" for i in (0, 1)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert lk.get_adapter_config(gpt2).fan_in_fan_out is True


def test_default_targets_by_model_type(llama, gpt2):
    lk.add_adapter(llama, lk.LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in adapted(llama)} == {"q_proj", "v_proj"}
    lk.add_adapter(gpt2, lk.LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in adapted(gpt2)} == {"c_attn"}


def test_no_default_targets_for_plain_modules():
    with pytest.raises(lk.TargetModulesError, match="target_modules is not set and there is no default for model "
                                                    "type None; set it"):
        lk.add_adapter(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig())


def test_exclude_modules(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "layers.0.self_attn.q_proj"]))
    names = adapted(llama)
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names


def test_exclude_modules_regex(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*"))
    assert adapted(llama) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("pattern", [None, "layers", ["layers"]])
def test_layers_to_transform(pattern):
    model = tiny_llama(num_hidden_layers=3)
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern=pattern))
    assert adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_layers_to_transform_single_index(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["v_proj"], layers_to_transform=1))
    assert adapted(llama) == ["model.layers.1.self_attn.v_proj"]


def test_rank_and_alpha_patterns_reach_the_layers(llama):
    lk.add_adapter(llama, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4}))
    q0, q1 = llama.model.layers[0].self_attn.q_proj, llama.model.layers[1].self_attn.q_proj
    v0 = llama.model.layers[0].self_attn.v_proj
    assert (q0.r["default"], q0.scaling["default"]) == (8, 2.0)
    assert (q1.r["default"], q1.scaling["default"]) == (2, 8.0)
    assert tuple(q1.lora_A["default"].weight.shape) == (2, 32)
    assert (v0.r["default"], v0.scaling["default"]) == (8, 0.5)


def test_no_match_lists_what_could_match(llama):
    with pytest.raises(lk.TargetModulesError) as e:
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["qproj"]))
    msg = str(e.value)
    assert msg.startswith("target_modules ['qproj'] matched no module of LlamaForCausalLM. Modules LoRA can adapt: ")
    for name in ("q_proj", "k_proj", "down_proj", "embed_tokens", "lm_head"):
        assert name in msg
    assert not hasattr(llama, "_lorakit")   # nothing half-done


def test_unmatched_list_entry_warns(llama):
    with pytest.warns(UserWarning, match=re.escape("target_modules entries ['qkv'] matched no module")):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "qkv"]))


def test_unsupported_target_type_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(lk.TargetModulesError, match=r"target module 1 is a LayerNorm; LoRA supports nn.Linear"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["0", "1"]))
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "_lorakit")


def test_modules_to_save_are_never_lora_targets(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    assert isinstance(llama.lm_head, ModulesToSave) and isinstance(llama.lm_head.original_module, nn.Linear)


def test_modules_to_save_must_match_something(llama):
    with pytest.raises(lk.TargetModulesError, match=r"modules_to_save \['head'\] matched no module"):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))


def test_plain_sequential_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    ref = model(x)
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model[0], LoraLinear) and isinstance(model[2], LoraLinear)
    assert torch.equal(model(x), ref)


# ---- names, freezing, training ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a.b", "__base__", "x y", 3])
def test_bad_adapter_names(llama, bad):
    with pytest.raises(lk.AdapterStateError, match="is not valid: use letters, digits"):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name=bad)


def test_duplicate_name_is_an_error(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterStateError, match="an adapter named 'default' already exists"):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["v_proj"]))


def test_base_is_frozen_and_adapter_trains(llama):
    lk.add_adapter(llama, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # closed form: r (d_in + d_out) per adapted matrix; q: 32 -> 32, v: 32 -> 16 (GQA)
    assert lk.trainable_parameters(llama)[0] == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_trainable_summary_line(llama):
    total = sum(p.numel() for p in llama.parameters())
    lk.add_adapter(llama, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    t = 2 * 4 * 64
    assert lk.trainable_summary(llama) == (f"trainable params: {t:,d} || all params: {total + t:,d} || "
                                           f"trainable%: {100 * t / (total + t):.4f}")


def test_one_optimizer_step_changes_only_adapter_and_saved_modules(llama, ids):
    lk.add_adapter(llama, lk.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, modules_to_save=["lm_head"]))
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    llama.train()
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    llama(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in llama.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert any("lm_head.modules_to_save.default" in n for n in changed)
    assert not any("original_module" in n or "base_layer" in n for n in changed)


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_bias_modes(gpt2, mode):
    lk.add_adapter(gpt2, lk.LoraConfig(target_modules=["c_attn"], bias=mode))
    biases = {n for n, p in gpt2.named_parameters() if p.requires_grad and n.endswith("bias")}
    if mode == "lora_only":
        assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}
    else:
        assert {f"transformer.h.{i}.mlp.c_fc.bias" for i in (0, 1)} | {"transformer.ln_f.bias"} <= biases


def test_second_adapter_added_frozen_when_asked(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name="a")
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name="b", trainable=False)
    q = llama.model.layers[0].self_attn.q_proj
    assert q.lora_A["a"].weight.requires_grad and not q.lora_A["b"].weight.requires_grad
    assert lk.active_adapters(llama) == ["b"] and lk.list_adapters(llama) == ["a", "b"]


# ---- switching and disabling -----------------------------------------------------------------


def test_active_adapters_are_summed(llama, ids):
    base = llama(ids).logits
    for name, seed in (("a", 1), ("b", 2)):
        lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "v_proj"]), name=name)
        perturb(llama, name, seed=seed)
    lk.set_active_adapters(llama, "a")
    ya = llama(ids).logits
    lk.set_active_adapters(llama, ["b"])
    yb = llama(ids).logits
    lk.set_active_adapters(llama, ["a", "b"])
    yab = llama(ids).logits
    assert not torch.allclose(ya, base) and not torch.allclose(yb, base)
    # the per-layer deltas add; compare at the first adapted layer's output directly
    q = llama.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    lk.set_active_adapters(llama, [])
    y0 = q(x)
    lk.set_active_adapters(llama, ["a"])
    da = q(x) - y0
    lk.set_active_adapters(llama, ["b"])
    db = q(x) - y0
    lk.set_active_adapters(llama, ["a", "b"])
    torch.testing.assert_close(q(x) - y0, da + db, atol=1e-6, rtol=0)
    assert not torch.allclose(yab, ya)


def test_set_active_unknown_name(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterStateError, match=r"no adapter named 'x'; adapters on this model: \['default'\]"):
        lk.set_active_adapters(llama, ["x"])


def test_disable_adapters_is_exact_and_restores(llama, ids):
    base = llama(ids).logits
    lk.add_adapter(llama, lk.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    perturb(llama)
    with torch.no_grad():
        llama.lm_head.modules_to_save["default"].weight.add_(1.0)
    adapted_out = llama(ids).logits
    with lk.disable_adapters(llama):
        assert torch.equal(llama(ids).logits, base)
    assert torch.equal(llama(ids).logits, adapted_out)


def test_disable_refuses_when_merged(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]))
    lk.merge_adapters(llama)
    with pytest.raises(lk.AdapterStateError, match="call unmerge_adapters first"):
        with lk.disable_adapters(llama):
            pass


def test_no_adapters_is_an_error():
    with pytest.raises(lk.AdapterStateError, match="has no lorakit adapters; call lorakit.add_adapter first"):
        lk.merge_adapters(nn.Linear(2, 2))


# ---- merge / unmerge / delete / unload -------------------------------------------------------


def test_merge_equals_unmerged_and_unmerge_restores(llama, ids):
    w0 = {n: p.detach().clone() for n, p in llama.named_parameters()}
    lk.add_adapter(llama, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(llama)
    y = llama(ids).logits
    lk.merge_adapters(llama)
    torch.testing.assert_close(llama(ids).logits, y, atol=1e-5, rtol=0)
    lk.merge_adapters(llama)   # idempotent
    torch.testing.assert_close(llama(ids).logits, y, atol=1e-5, rtol=0)
    lk.unmerge_adapters(llama)
    for n, p in llama.named_parameters():
        key = n.replace(".base_layer", "")
        if key in w0:
            torch.testing.assert_close(p, w0[key], atol=1e-6, rtol=0)


def test_safe_merge_refuses_nan_and_writes_nothing(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "v_proj"]))
    v1 = llama.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        v1.lora_B["default"].weight[0, 0] = float("nan")
    before = llama.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(lk.AdapterStateError, match=r"merging \['default'\] into model.layers.1.self_attn.v_proj gives "
                                                   "NaN/inf weights; nothing was merged"):
        lk.merge_adapters(llama, safe=True)
    assert torch.equal(llama.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    assert not llama.model.layers[0].self_attn.q_proj.merged_adapters


def test_merge_requires_active(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name="a")
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name="b")
    with pytest.raises(lk.AdapterStateError, match=r"adapters \['a'\] are not active"):
        lk.merge_adapters(llama, ["a"])
    lk.merge_adapters(llama, ["b"])
    with pytest.raises(lk.AdapterStateError, match=r"adapters \['b'\] are merged into the base weights"):
        lk.set_active_adapters(llama, ["a"])


def test_delete_adapter(llama, ids):
    base = llama(ids).logits
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]), name="a")
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj", "v_proj"]), name="b")
    lk.delete_adapter(llama, "b")
    assert lk.list_adapters(llama) == ["a"] and lk.active_adapters(llama) == []
    assert isinstance(llama.model.layers[0].self_attn.v_proj, nn.Linear)    # unwrapped: no adapter left there
    assert isinstance(llama.model.layers[0].self_attn.q_proj, LoraLayer)
    lk.delete_adapter(llama, "a")
    assert not hasattr(llama, "_lorakit") and adapted(llama) == []
    assert all(p.requires_grad for p in llama.parameters())                  # given back as it was
    assert torch.equal(llama(ids).logits, base)


def test_delete_merged_adapter_is_refused(llama):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["q_proj"]))
    lk.merge_adapters(llama)
    with pytest.raises(lk.AdapterStateError, match="is merged into model.layers.0.self_attn.q_proj; unmerge_adapters first"):
        lk.delete_adapter(llama, "default")


@pytest.mark.parametrize("merge", [True, False])
def test_unload_returns_plain_model(llama, ids, merge):
    base = llama(ids).logits
    lk.add_adapter(llama, lk.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    perturb(llama)
    with torch.no_grad():
        llama.lm_head.modules_to_save["default"].weight.mul_(1.5)
    y = llama(ids).logits
    plain = lk.unload(llama, merge=merge)
    assert plain is llama and not hasattr(plain, "_lorakit")
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(plain(ids).logits, y if merge else base, atol=1e-5, rtol=0)


def test_embedding_targets(llama, ids):
    lk.add_adapter(llama, lk.LoraConfig(target_modules=["embed_tokens"]))
    assert isinstance(llama.model.embed_tokens, LoraEmbedding)
    assert llama.get_input_embeddings() is llama.model.embed_tokens


# ---- transformers integration ----------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_uses_the_adapter(make, ids):
    model = make()
    base = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"))
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), base)   # B = 0
    perturb(model, std=0.5)
    with lk.disable_adapters(model):
        assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), base)
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    lk.merge_adapters(model)
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(make, ids):
    grads = []
    for checkpointing in (False, True):
        model = make()
        lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", lora_dropout=0.1))
        perturb(model)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(3)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
