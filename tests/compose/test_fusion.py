"""AdapterFusion for LoRA (`lk.add_fusion`): the attention and output against a closed form that
materialises every adapter output o_i, the identity start (one adapter, or one-hot attention, gives
exactly that adapter's output), which parameters train, save/load, and errors. fp32, CPU."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from mixture_support import (
    NAMES,
    X,
    base_model,
    eval_loss,
    expert_terms,
    mixed_eval,
    mixture_args,
    randomise,
    single_expert_losses,
    split_args,
    tiny_with_experts,
)
from tiny_models import tiny_gpt2, tiny_llama

import lorakit as lk
from lorakit.builtin.tasks import task_of
from lorakit.compose.fusion import QK_INIT_STD, AdapterFusion
from lorakit.compose.mixture import composers
from lorakit.compose.mixture_files import CONFIG_NAME, load_mixture_weights
from lorakit.inject import lora_layers
from lorakit.train.config import load_config
from lorakit.train.data import collate
from lorakit.train.loop import train

ATOL = 1e-6




def _randomise_fusion(model, seed: int = 7, scale: float = 0.5) -> None:
    """Random Q, K and V (all of them, V_B included, so V is no longer the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, c in composers(model):
            for p in c.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("value_rank", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_fusion_matches_the_closed_form(value_rank, temperature):
    """a = softmax(Qx . K o_i / (T sqrt(d_k))), y = base(x) + V(sum_i a_i o_i), with o_i computed
    one by one (b carries a lora_bias, whose key term the fused computation adds separately)."""
    model = tiny_with_experts()
    config = lk.FusionConfig(key_dim=3, value_rank=value_rank, temperature=temperature)
    lk.add_fusion(model, NAMES, config)
    _randomise_fusion(model)
    c = model.proj.composer
    o = expert_terms(model, X, NAMES)                                        # (2, 4, N, 5)
    q = X @ c.query.weight.t()                                               # (2, 4, d_k)
    k = o @ c.key.weight.t()                                                 # (2, 4, N, d_k)
    att = torch.softmax((k @ q[..., None]).squeeze(-1) / (temperature * math.sqrt(3)), dim=-1)   # (2, 4, N)
    mixed = (att[..., None] * o).sum(-2)                                     # (2, 4, 5)
    V = c.value.weight if value_rank is None else torch.eye(5) + c.value_B.weight @ c.value_A.weight
    expected = model.proj.base_layer(X) + mixed @ V.t()
    with torch.no_grad():
        torch.testing.assert_close(model.proj(X), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(c.last_attention, att.reshape(-1, 3), atol=ATOL, rtol=0)
    assert att.min() < 0.2 and att.max() > 0.5      # far from uniform: the test sees the attention


def _single_adapter_logits(model, ids, name):
    lk.set_active_adapters(model, [name])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("value_rank", [None, 16])
def test_one_adapter_at_init_is_exactly_that_adapter(make, value_rank):
    """N = 1: the attention is 1 and V starts at the identity, so fusion adds o_1 exactly."""
    model = make()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name="a")
    randomise(model, "a", 0)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = _single_adapter_logits(model, ids, "a")
    lk.add_fusion(model, ["a"], lk.FusionConfig(value_rank=value_rank))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_one_hot_attention_gives_the_chosen_adapter():
    """Keys that single out adapter b and a tiny temperature make the attention one-hot on b: with
    V at the identity, the layer then adds exactly b's output. Construction: b writes only output
    coordinate 0 (o_b = s_b (w.x) e_0), a and c never write it, K reads coordinate 0 and Q = w, so
    the scores are s_b (w.x)^2 > 0 for b and 0 for a and c."""
    model = tiny_with_experts()
    lk.add_fusion(model, NAMES, lk.FusionConfig(key_dim=1, temperature=1e-4))
    layer, c = model.proj, model.proj.composer
    w = torch.randn(6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_A["b"].weight.zero_()
        layer.lora_A["b"].weight[0] = w
        layer.lora_B["b"].weight.zero_()
        layer.lora_B["b"].weight[0, 0] = 1.0
        layer.lora_B["b"].bias.zero_()
        for e in ("a", "c"):
            layer.lora_B[e].weight[0] = 0.0
        c.key.weight.copy_(torch.eye(5)[:1])
        c.query.weight.copy_(w[None])
        got = model.proj(X)
    assert c.last_attention[:, 1].min() > 1 - 1e-6
    expected = layer.base_layer(X) + expert_terms(model, X, NAMES)[..., 1, :]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - layer.base_layer(X))[..., 0].abs().min() > 1e-3     # b's output is not trivially zero


def test_initial_attention_is_nearly_uniform_and_the_start_is_the_mean_of_the_adapters():
    model = tiny_with_experts()
    torch.manual_seed(0)
    lk.add_fusion(model, NAMES)
    c = model.proj.composer
    assert c.query.weight.std().item() == pytest.approx(QK_INIT_STD, rel=0.2)
    assert torch.equal(c.value_B.weight, torch.zeros_like(c.value_B.weight))
    with torch.no_grad():
        got = model.proj(X)
        c.query.weight.zero_()                    # exactly uniform attention
        uniform = model.proj(X)
    assert (c.last_attention - 1 / 3).abs().max() == 0
    torch.testing.assert_close(uniform, model.proj.base_layer(X) + expert_terms(model, X, NAMES).mean(-2),
                               atol=ATOL, rtol=0)
    assert (got - uniform).abs().max() < 1e-3      # small random Q, K: nearly the same


def test_only_fusion_parameters_train():
    model = tiny_with_experts()
    lk.add_fusion(model, NAMES, lk.FusionConfig(key_dim=4, value_rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"proj.composer.{m}.weight" for m in ("query", "key", "value_A", "value_B")}
    assert lk.trainable_parameters(model)[0] == 4 * 6 + 4 * 5 + 2 * 5 + 5 * 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for _ in range(5):
        loss = (model(X) - 1).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_full_value_projection_starts_at_the_identity():
    model = tiny_with_experts()
    lk.add_fusion(model, NAMES, lk.FusionConfig(value_rank=None))
    c = model.proj.composer
    assert torch.equal(c.value.weight, torch.eye(5)) and not hasattr(c, "value_A")
    assert lk.trainable_parameters(model)[0] == 64 * 6 + 64 * 5 + 5 * 5


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_llama()
    for seed, name in enumerate("ab"):
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), name=name)
        randomise(model, name, seed)
    lk.add_fusion(model, ["a", "b"], lk.FusionConfig(key_dim=8, value_rank=4, temperature=0.5))
    _randomise_fusion(model, scale=0.3)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    lk.save_mixture(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["kind"] == "fusion" and meta["config"] == {"key_dim": 8, "value_rank": 4, "temperature": 0.5}
    fresh = lk.load_mixture(tiny_llama(), tmp_path)
    assert all(isinstance(c, AdapterFusion) for _, c in composers(fresh)) and len(composers(fresh)) == 4
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert lk.trainable_parameters(fresh)[0] == 0
    trainable = lk.load_mixture(tiny_llama(), tmp_path, trainable=True)
    assert {n.split(".composer.")[1] for n, p in trainable.named_parameters() if p.requires_grad} == \
        {"query.weight", "key.weight", "value_A.weight", "value_B.weight"}


def test_fusion_and_mixture_weights_do_not_mix(tmp_path):
    model = tiny_with_experts()
    lk.add_fusion(model, ["a", "b"])
    lk.save_mixture(model, tmp_path)
    other = tiny_with_experts()
    lk.add_mixture(other, ["a", "b"])
    with pytest.raises(lk.AdapterFileError, match=r"describes a fusion of \['a', 'b'\] .* but this model has a moe"):
        load_mixture_weights(other, tmp_path)
    with pytest.raises(lk.AdapterStateError, match="no mixture of experts; call add_mixture first"):
        lk.mixture_aux_loss(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"key_dim": 0}, "FusionConfig.key_dim must be an integer >= 1, got 0"),
    ({"value_rank": 0}, "FusionConfig.value_rank must be an integer >= 1 or None, got 0"),
    ({"value_rank": True}, "FusionConfig.value_rank must be an integer >= 1 or None, got True"),
    ({"temperature": -1.0}, "FusionConfig.temperature must be a number > 0, got -1.0"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(lk.ConfigError, match=re.escape(message)):
        lk.FusionConfig(**kwargs)


def test_errors():
    model = tiny_with_experts()
    with pytest.raises(lk.LoraError, match="config must be a lorakit.FusionConfig, got MixtureConfig"):
        lk.add_fusion(model, NAMES, lk.MixtureConfig())
    with pytest.raises(lk.AdapterStateError, match="no adapter named 'x'"):
        lk.add_fusion(model, ["a", "x"])
    lk.add_fusion(model, NAMES)
    with pytest.raises(lk.AdapterStateError, match="already has a mixture or fusion; call remove_mixture before adding "
                                                   "a mixture of experts"):
        lk.add_mixture(model, NAMES)
    lk.remove_mixture(model)
    assert model.proj.composer is None and not any(p.requires_grad for _, layer in lora_layers(model)
                                                   for p in layer.parameters())


def test_lorakit_train_fusion_saves_and_loads(tiny_experts, tmp_path):
    """The mechanics of the test below on the tiny experts, in the fast suite: a fusion run over
    them writes its files, and what it saved loads back to the same eval loss."""
    out = tmp_path / "fusion"
    s = train(load_config(*split_args(mixture_args(tiny_experts, out, 2, "mixture.kind=fusion",
                                                   f"data.eval={tiny_experts / 'mixed_eval.jsonl'}"))))
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["kind"] == "fusion" and meta["experts"] == ["sentiment", "parity"]
    loaded = lk.load_mixture(base_model(tiny_experts), out)
    assert composers(loaded) and all(isinstance(c, AdapterFusion) for _, c in composers(loaded))
    assert eval_loss(loaded, tiny_experts) == pytest.approx(s.eval_after.loss, abs=1e-5)


@pytest.mark.slow   # learning: the experts are trained on the built-in model first
def test_lorakit_train_fusion_learns_saves_and_loads(experts, tmp_path):
    """AdapterFusion over the two task experts (mixture_support.py), trained with the loop on the mixed
    tasks: the loss falls, the saved run loads back to the same eval loss, and the fusion beats each
    expert alone on the mixed held-out set."""
    out = tmp_path / "fusion"
    s = train(load_config(*split_args(mixture_args(experts, out, 12, "mixture.kind=fusion", "training.lr=1e-2",
                                               f"data.eval={experts / 'mixed_eval.jsonl'}"))))
    assert sum(s.losses[-3:]) < sum(s.losses[:3]) and s.eval_after.loss < s.eval_before.loss, s.losses
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["kind"] == "fusion" and meta["config"] == {"key_dim": 64, "value_rank": 16, "temperature": 1.0}
    loaded = lk.load_mixture(base_model(), out)
    assert composers(loaded) and all(isinstance(c, AdapterFusion) for _, c in composers(loaded))
    assert eval_loss(loaded, experts) == pytest.approx(s.eval_after.loss, abs=1e-5)
    assert s.eval_after.loss < min(single_expert_losses(experts).values())
    # it prefers the right adapter: more attention on the sentiment expert for sentiment prompts
    # than for parity prompts (mean over the tokens of every fused layer)
    tokenizer, examples = mixed_eval(experts)
    records = [json.loads(line)["messages"][0]["content"]
               for line in (experts / "mixed_eval.jsonl").read_text().splitlines()]
    on_sentiment = {}
    for task in ("sentiment", "parity"):
        rows = [e for e in examples if task_of(records[int(e.source.rsplit(":", 1)[1]) - 1]) == task]
        with torch.no_grad():
            loaded(**{k: v for k, v in collate(rows, tokenizer.pad_token_id).items() if k != "labels"})
        names = composers(loaded)[0][1].experts
        on_sentiment[task] = torch.stack([c.last_attention[:, names.index("sentiment")].mean()
                                          for _, c in composers(loaded)]).mean().item()
    assert on_sentiment["sentiment"] > on_sentiment["parity"] + 0.05, on_sentiment
