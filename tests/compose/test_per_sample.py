"""One batch, a different adapter per row (`lk.per_sample_adapters`).

The reference for every row is that row run alone with its adapter as the only active one (or
with adapters disabled for "__base__"): the mixed batch must give each row exactly that, in the
forward pass and in `generate` (greedy, beam search, sampling with several return sequences).
PEFT's `adapter_names=` mixed-batch forward and generate, on the same adapters loaded from
lorakit's files, is the second reference. fp32 on tiny models; tolerance 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from per_sample_support import ATOL, BASE, llama_with_adapters, random_ids, randomise, run_alone
from tiny_models import tiny_gpt2, tiny_llama

import lorakit as lk
from lorakit.compose.per_sample import _RowComposer, per_sample_adapters
from lorakit.inject import lora_layers

NAMES = ["a", BASE, "b", "c", "a", "b"]
GEN = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)   # no early EOS: rows keep one length


def _gpt2_with_adapters() -> torch.nn.Module:
    """GPT-2's Conv1D layers (fan_in_fan_out); b carries a lora_bias."""
    model = tiny_gpt2()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=6, lora_alpha=3, target_modules=["c_attn", "c_fc"], lora_bias=True), name="b")
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["c_proj"]), name="c")
    for seed, name in enumerate("abc"):
        randomise(model, name, seed, scale=0.2)
    return model


def _peft_model(build, tmp_path):
    """PEFT with the same adapters, read from the files lorakit writes."""
    import peft

    model = build()
    for name in lk.list_adapters(model):
        lk.save_adapter(model, tmp_path / name, name=name)
    base = tiny_llama() if build is llama_with_adapters else tiny_gpt2()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(tmp_path / name, adapter_name=name)
    return model, pm.eval()


@pytest.fixture(params=["auto", "per_row", "per_adapter"])
def layout(request, monkeypatch):
    """Run a test with the composer's own choice of layout, then with each layout forced: both
    must give every row its own adapter, whatever the shapes."""
    if request.param != "auto":
        monkeypatch.setattr(_RowComposer, "per_adapter", lambda self, tokens: request.param == "per_adapter")
    return request.param


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama_with_adapters, _gpt2_with_adapters], ids=["llama", "gpt2-conv1d"])
def test_each_row_equals_that_row_alone_with_its_adapter(build, layout):
    model = build()
    ids = random_ids(len(NAMES))
    with torch.no_grad():
        with per_sample_adapters(model, NAMES):
            mixed = model(ids).logits                                     # (6, 7, vocab)
        with lk.disable_adapters(model):
            base = model(ids).logits
        for i, name in enumerate(NAMES):
            alone = run_alone(model, name, lambda i=i: model(ids[i:i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], alone, atol=ATOL, rtol=0)
            if name != BASE:   # the adapter really acts on this row
                assert (mixed[i] - base[i]).abs().max() > 1e-2


def test_embedding_rows_use_their_own_adapter_table(layout):
    model = llama_with_adapters()
    lk.add_adapter(model, lk.LoraConfig(r=5, lora_alpha=7, target_modules=["embed_tokens"]), name="e")
    randomise(model, "e", 9, scale=0.2)
    emb = model.model.embed_tokens                     # held by c and e (ranks 3 and 5)
    names = ["e", BASE, "c", "a", "e", "c", "e"]       # a is not in this layer: base rows there
    ids = random_ids(len(names))
    with torch.no_grad(), per_sample_adapters(model, names):
        mixed = emb(ids)                                                  # (7, 7, 32)
    with torch.no_grad():
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: emb(ids[i:i + 1])[0])
            torch.testing.assert_close(mixed[i], alone, atol=ATOL, rtol=0)
        for i in (0, 2):                                                  # rows e and c changed
            assert not torch.allclose(mixed[i], emb.base_layer(ids[i]), atol=1e-2)


@pytest.mark.parametrize("build", [llama_with_adapters, _gpt2_with_adapters], ids=["llama", "gpt2-conv1d"])
def test_forward_matches_peft_adapter_names(build, tmp_path):
    model, pm = _peft_model(build, tmp_path)
    ids = random_ids(len(NAMES))
    with torch.no_grad():
        with per_sample_adapters(model, NAMES):
            ours = model(ids).logits
        theirs = pm(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_flattened_token_batches_keep_each_rows_adapter(layout):
    """A layer fed (rows * tokens, d_in), as MoE routers are, still maps tokens to their row."""
    model = llama_with_adapters()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(len(NAMES), 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), per_sample_adapters(model, NAMES):
        rows = q(x)                                                       # (6, 5, 32)
        flat = q(x.reshape(-1, 32))                                       # (30, 32)
    torch.testing.assert_close(flat.reshape(rows.shape), rows, atol=ATOL, rtol=0)


def test_layout_is_the_one_that_copies_fewer_rows():
    """q_proj of layer 0 holds a (r=4, 2 rows), b (r=2 there, 2 rows) and c (r=3, 1 row): grouped
    by adapter that is 3 groups of 2 rows (c padded) against 6 rows x R=4 factor rows per token."""
    model = llama_with_adapters()
    with per_sample_adapters(model, NAMES):
        composer = model.model.layers[0].self_attn.q_proj.composer
        assert composer.rows.tolist() == [[0, 4], [2, 5], [3, 3]] and composer.keep.tolist() == [True] * 5 + [False]
        assert [composer.per_adapter(m) for m in (1, 4, 5, 7)] == [True, True, False, False]   # 6 m <= 24


def test_stacks_are_a_snapshot_taken_on_entry():
    model = llama_with_adapters()
    ids = random_ids(2)
    with torch.no_grad(), per_sample_adapters(model, ["a", "b"]):
        before = model(ids).logits
        for _, layer in lora_layers(model):
            if "a" in layer.r:
                layer.lora_B["a"].weight.zero_()
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_active_modules_to_save_copy_is_not_used_inside():
    """Another adapter's lm_head copy is active; inside the block every row sees the original."""
    model = llama_with_adapters()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), name="m")
    with torch.no_grad():
        model.lm_head.modules_to_save["m"].weight.mul_(3.0)
    lk.set_active_adapters(model, ["m"])
    names, ids = ["a", BASE], random_ids(2)
    with torch.no_grad():
        with per_sample_adapters(model, names):
            mixed = model(ids).logits
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: model(ids[i:i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], alone, atol=ATOL, rtol=0)
    assert model.lm_head.disabled is False


# ---- generate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beams, returns", [(1, 1), (2, 1), (3, 2)])
def test_generate_rows_equal_single_adapter_generate(beams, returns, layout):
    model = llama_with_adapters()
    names, ids = ["a", BASE, "b", "c"], random_ids(4, width=6, seed=2)
    kw = dict(GEN, do_sample=False, num_beams=beams, num_return_sequences=returns)
    with torch.no_grad():
        with per_sample_adapters(model, names):
            mixed = model.generate(ids, **kw)                             # (4 * returns, 6 + 4)
        assert mixed.shape == (4 * returns, 10)
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: model.generate(ids[i:i + 1], **kw))
            assert torch.equal(mixed[i * returns:(i + 1) * returns], alone), name
        outputs = {tuple(mixed[i * returns].tolist()) for i in range(4)}
    assert len(outputs) == 4   # the adapters lead to different continuations


def test_sampling_logits_at_every_step_equal_each_rows_own_adapter():
    """Sampling with 2 return sequences per row: the logits generate saw at every step equal the
    teacher-forced logits of that sequence under its own adapter, so the right adapter ran on
    every expanded row at every step, whatever was sampled."""
    model = llama_with_adapters()
    names, ids = ["b", "a", BASE], random_ids(3, width=5, seed=4)
    torch.manual_seed(0)
    with torch.no_grad():
        with per_sample_adapters(model, names):
            out = model.generate(ids, **GEN, do_sample=True, num_return_sequences=2, output_logits=True,
                                 return_dict_in_generate=True)
        seqs = out.sequences                                              # (6, 5 + 4)
        seen = torch.stack(out.logits, dim=1)                             # (6, 4, vocab)
        for j in range(seqs.shape[0]):
            forced = run_alone(model, names[j // 2], lambda j=j: model(seqs[j:j + 1, :-1]).logits[0, 4:])
            torch.testing.assert_close(seen[j], forced, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sample, beams", [(True, 1), (False, 2)], ids=["sampling", "beam2"])
def test_generate_matches_peft_adapter_names(sample, beams, tmp_path):
    """Same seed, same logits: sampling draws the same tokens in both tools."""
    model, pm = _peft_model(llama_with_adapters, tmp_path)
    names, ids = ["c", "a", BASE, "b"], random_ids(4, width=6, seed=5)
    kw = dict(GEN, do_sample=sample, num_beams=beams)
    with torch.no_grad():
        torch.manual_seed(7)
        with per_sample_adapters(model, names):
            ours = model.generate(ids, **kw)
        torch.manual_seed(7)
        theirs = pm.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(ours, theirs)


# ---- state and errors ---------------------------------------------------------------------------


def test_previous_composer_comes_back_also_after_an_exception():
    model = llama_with_adapters()
    layers = [layer for _, layer in lora_layers(model)]

    def outer(layer, x, base_out):
        return base_out

    layers[0].composer = outer
    with per_sample_adapters(model, ["a"]):
        assert all(callable(layer.composer) for layer in layers) and layers[0].composer is not outer
    assert layers[0].composer is outer and all(layer.composer is None for layer in layers[1:])
    with pytest.raises(RuntimeError, match="boom"), per_sample_adapters(model, ["a"]):
        raise RuntimeError("boom")
    assert layers[0].composer is outer and all(layer.composer is None for layer in layers[1:])


def _message(fn) -> str:
    with pytest.raises(lk.LoraError) as info:
        fn()
    return str(info.value)


def _enter(model, names):
    with per_sample_adapters(model, names):
        pass


def test_bad_names_are_refused_with_the_loaded_adapters_listed():
    model = llama_with_adapters()
    assert _message(lambda: _enter(model, ["a", "nope"])) == \
        "no adapter named 'nope'; adapters on this model: ['a', 'b', 'c']"
    assert _message(lambda: _enter(model, "a")) == \
        "per_sample_adapters needs a list with one adapter name per batch row (or '__base__'), got 'a'"
    assert _message(lambda: _enter(model, [])) == \
        "per_sample_adapters needs at least one adapter name (one per batch row)"
    assert all(layer.composer is None for _, layer in lora_layers(model))


def test_batch_size_must_be_a_multiple_of_the_names():
    model = llama_with_adapters()
    with per_sample_adapters(model, ["a", "b", BASE]), torch.no_grad():
        msg = _message(lambda: model(random_ids(4)))
    assert msg == (
        "per_sample_adapters was given 3 adapter names but model.embed_tokens got a batch of 4 rows; give one "
        "name per batch row (generate's num_beams / num_return_sequences may repeat each row k times, so a "
        "multiple of 3 is accepted)"
    )


def test_training_mode_is_refused():
    model = llama_with_adapters().train()
    with per_sample_adapters(model, ["a", "b"]):
        msg = _message(lambda: model(random_ids(2)))
    assert msg == (
        "per_sample_adapters is for inference, but model.embed_tokens is in training mode (its dropout would be "
        "skipped and no gradient reaches the adapters); call model.eval() first"
    )


def test_merged_dora_and_modules_to_save_adapters_are_refused():
    model = llama_with_adapters()
    lk.set_active_adapters(model, ["a"])
    lk.merge_adapters(model)
    assert _message(lambda: _enter(model, ["b"])) == (
        "adapters ['a'] are merged into the base weights, so rows could not get the base or another adapter; "
        "call unmerge_adapters before per_sample_adapters"
    )
    lk.unmerge_adapters(model)
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["k_proj"], use_dora=True), name="d")
    assert _message(lambda: _enter(model, ["a", "d"])) == (
        "per_sample_adapters does not support DoRA adapters: ['d'] use DoRA in model.layers.0.self_attn.k_proj. "
        "Merge them with merge_adapters or batch them separately"
    )
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), name="m")
    assert _message(lambda: _enter(model, ["m", BASE])) == (
        "adapters ['m'] have modules_to_save copies, which per_sample_adapters cannot switch per row; batch their "
        "rows separately with set_active_adapters"
    )
    assert all(layer.composer is None for _, layer in lora_layers(model))


def test_conv_and_max_norm_embedding_layers_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Embedding(10, 4, max_norm=1.0))
    lk.add_adapter(net, lk.LoraConfig(r=2, target_modules=["0"]), name="conv")
    lk.add_adapter(net, lk.LoraConfig(r=2, target_modules=["1"]), name="emb")
    assert _message(lambda: _enter(net, ["conv"])) == (
        "per_sample_adapters does not support conv layers; 0 holds ['conv']. Use set_active_adapters and one "
        "batch per adapter instead"
    )
    assert _message(lambda: _enter(net, ["emb", BASE])) == (
        "per_sample_adapters does not support embeddings with max_norm (1); use set_active_adapters and one batch "
        "per adapter instead"
    )
    net.eval()
    with per_sample_adapters(net, [BASE, BASE]), torch.no_grad():   # a conv without a named adapter is fine
        x = torch.randn(2, 4, 6)
        torch.testing.assert_close(net[0](x), net[0].base_layer(x), atol=0, rtol=0)
