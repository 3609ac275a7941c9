"""`StackedAdapters`: the factors stacked once, reused by many batches (what the server runs).
Each row must get what it gets alone with its adapter, as with `per_sample_adapters`, also when a
batch uses a subset of the stacked adapters in another order (the gathered-groups path)."""

from __future__ import annotations

import pytest
import torch
from per_sample_support import ATOL, BASE, llama_with_adapters, random_ids, randomise, run_alone

import lorakit as lk
from lorakit.compose.per_sample import StackedAdapters, _RowComposer, per_sample_adapters
from lorakit.errors import AdapterStateError, LoraError
from lorakit.inject import lora_layers


@pytest.fixture(params=["auto", "per_row", "per_adapter"])
def layout(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setattr(_RowComposer, "per_adapter", lambda self, tokens: request.param == "per_adapter")
    return request.param


@pytest.mark.parametrize("names", [["a", BASE, "b", "c", "a", "b"], ["c", "a", "c"], ["b"], [BASE, BASE],
                                   ["a", "a", "c", "c"]],
                         ids=["all", "subset-out-of-order", "one", "base-only", "rows-in-adapter-order"])
def test_each_row_equals_that_row_alone(names, layout):
    model = llama_with_adapters()
    stacks = StackedAdapters(model, ["a", "b", "c"])
    ids = random_ids(len(names))
    with torch.no_grad():
        with stacks.rows(names):
            mixed = model(ids).logits                                     # (n, 7, vocab)
        with per_sample_adapters(model, names):
            reference = model(ids).logits
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: model(ids[i:i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed, reference, atol=ATOL, rtol=0)


def test_generate_with_the_stacks_reused_across_batches():
    model = llama_with_adapters()
    stacks = StackedAdapters(model, ["a", "b", "c"])
    for names in (["a", "b"], ["c", BASE, "a"]):
        ids = random_ids(len(names), seed=len(names))
        with torch.no_grad():
            with stacks.rows(names):
                mixed = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            for i, name in enumerate(names):
                alone = run_alone(model, name, lambda i=i, ids=ids: model.generate(
                    ids[i:i + 1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0))
                assert torch.equal(mixed[i], alone[0])


def test_layers_holding_the_same_adapters_share_one_plan():
    model = llama_with_adapters()
    stacks = StackedAdapters(model, ["a", "b", "c"])
    with stacks.rows(["b", "a", "b"]):
        composers = [layer.composer for _, layer in lora_layers(model)]
    q0, k0 = model.model.layers[0].self_attn.q_proj.composer, model.model.layers[0].self_attn.k_proj.composer
    assert q0 is None and k0 is None   # restored on exit
    held = {}
    for (_, layer), composer in zip(lora_layers(model), composers, strict=True):
        key = tuple(a for a in ("a", "b", "c") if a in layer.r)
        held.setdefault(key, []).append(composer)
    for group in held.values():
        assert all(c.slots is group[0].slots for c in group)             # one plan per adapter set
    k_proj = model.model.layers[0].self_attn.k_proj                     # holds a and b: slots 1, 2
    with stacks.rows(["b", "a", "b"]):
        assert k_proj.composer.rows.tolist() == [[0, 2], [1, 1]]        # b's rows, then a's (padded)
        assert k_proj.composer.group_slots.tolist() == [2, 1]
        assert not k_proj.composer.in_order
    with stacks.rows(["a", "a", "b", "b"]):   # consecutive equal groups: x is grouped by a view
        assert k_proj.composer.in_order and k_proj.composer.rows.tolist() == [[0, 1], [2, 3]]


def test_the_stacks_are_a_snapshot_until_rebuilt():
    model = llama_with_adapters()
    stacks = StackedAdapters(model, ["a", "b"])
    ids = random_ids(2)
    with torch.no_grad(), stacks.rows(["a", "b"]):
        before = model(ids).logits
    randomise(model, "a", seed=42, scale=0.2)
    with torch.no_grad():
        with stacks.rows(["a", "b"]):
            stale = model(ids).logits
        with StackedAdapters(model, ["a", "b"]).rows(["a", "b"]):
            fresh = model(ids).logits
    torch.testing.assert_close(stale, before, atol=0, rtol=0)
    assert (fresh[0] - before[0]).abs().max() > 1e-2
    torch.testing.assert_close(fresh[1], before[1], atol=ATOL, rtol=0)


def test_unknown_duplicate_and_unservable_adapters_are_refused():
    model = llama_with_adapters()
    stacks = StackedAdapters(model, ["a", "b"])
    with pytest.raises(AdapterStateError, match=r"adapters \['c'\] are not stacked; stacked adapters: \['a', 'b'\]"):
        with stacks.rows(["a", "c"]):
            pass
    with pytest.raises(LoraError, match="distinct adapter names"):
        StackedAdapters(model, ["a", "a"])
    with pytest.raises(AdapterStateError, match="no adapter named 'zzz'"):
        StackedAdapters(model, ["zzz"])
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="d")
    with pytest.raises(AdapterStateError, match="does not support DoRA"):
        StackedAdapters(model, ["a", "d"])


def test_no_stacked_adapters_leaves_every_row_on_the_base():
    model = llama_with_adapters()
    ids = random_ids(2)
    with torch.no_grad():
        with StackedAdapters(model, []).rows([BASE, BASE]):
            out = model(ids).logits
        with lk.disable_adapters(model):
            base = model(ids).logits
    torch.testing.assert_close(out, base, atol=0, rtol=0)
