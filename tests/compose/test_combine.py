"""Combining adapters into one (`lk.combine_adapters`, `lorakit combine`).

References: DESIGN.md's test vectors for the element-wise functions; closed forms (cat is the sum
of the weighted updates, svd is the dense truncated SVD of that sum, one adapter with weight 1 is
itself); PEFT 0.21.2's `add_weighted_adapter` on the same PEFT-format adapters for every method,
DARE included (PEFT's global RNG is reseeded where its merge loop starts, so both draw the same
masks). fp32 on tiny models.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from adapter_support import randomise
from peft import PeftModel
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit as lk
from lorakit.cli import main
from lorakit.compose.combine import METHODS, _refactor
from lorakit.compose.merge_ops import drop_random, merge_tasks, prune_magnitude
from lorakit.inject import lora_layers

ATOL = 1e-5
TASKS = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.1],
                      [-1.5, 1.0, 0.2, -4.0, 0.3],
                      [2.0, -0.5, -0.3, 1.5, 0.05]])
DENSITY = {m: 0.5 for m in METHODS if m not in ("linear", "cat", "svd")}
SEEDED = [m for m in METHODS if m.startswith("dare")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matrices here are tiny, and threaded MKL (SVD, matmul) on a busy machine spends seconds per
    call synchronising its threads; one thread keeps the file fast. The previous count comes back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _options(method: str, density: float | None = None) -> dict:
    opts = {}
    if method in DENSITY:
        opts["density"] = DENSITY[method] if density is None else density
    if method in SEEDED:
        opts["seed"] = 3
    return opts


# ---- element-wise functions: DESIGN.md's vectors ------------------------------------------------


def test_prune_magnitude_keeps_floor_density_times_numel_largest():
    # floor(0.6 * 5) = 3 entries per row. DESIGN.md lists the third row as [2, 0, 0, 1.5, 0], but its
    # own ties / magnitude_prune vectors (and PEFT) need -0.5 kept: the third largest |entry| is 0.5.
    expected = [[1, -2, 0, 3, 0], [-1.5, 1, 0, -4, 0], [2, -0.5, 0, 1.5, 0]]
    assert [prune_magnitude(t, 0.6).tolist() for t in TASKS] == expected


@pytest.mark.parametrize("weights, density, expected", [
    ([1, 1, 1], 0.6, [1.5, -1.25, 0, 2.25, 0]),
    ([2, 1, 1], 0.6, [2.0, -2.25, 0, 3.75, 0]),
    ([1, 1, 1], 1.0, [1.5, -1.25, 0.35, 2.25, 0.175]),
])
def test_ties_vectors(weights, density, expected):
    out = merge_tasks(list(TASKS), weights, "ties", density)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_magnitude_prune_vector():
    out = merge_tasks(list(TASKS), [1, 1, 1], "magnitude_prune", 0.6)
    torch.testing.assert_close(out, torch.tensor([1.5, -1.5, 0, 0.5, 0]), atol=1e-6, rtol=0)


def test_ties_sign_election_total_vs_frequency():
    # one large positive entry against two small negative ones: the sum says +, the vote says -
    tasks = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert merge_tasks(tasks, [1, 1, 1], "ties", 1.0, "total").item() == 3.0
    assert merge_tasks(tasks, [1, 1, 1], "ties", 1.0, "frequency").item() == -1.0
    # the sign is elected on the unweighted tensors: a negative weight does not flip the election
    assert merge_tasks(tasks, [-1, 1, 1], "ties", 1.0, "total").item() == -3.0


def test_dare_statistics():
    t = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) + 0.5
    out = drop_random(t, 0.3, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / t.numel()) ** 0.5      # 4 sigma
    torch.testing.assert_close(out[kept], t[kept] / 0.3)                                  # rescaled survivors
    assert abs(out.mean().item() - t.mean().item()) < 0.01                                # mean kept (sd ~0.004)
    assert torch.equal(out, drop_random(t, 0.3, torch.Generator().manual_seed(1)))        # seeded
    assert not torch.equal(out, drop_random(t, 0.3, torch.Generator().manual_seed(2)))
    assert drop_random(t, 1.0) is t                                                      # density 1: untouched


# ---- models with adapters, saved in PEFT's format --------------------------------------------------


class ConvNet(nn.Module):
    """A 3x3 conv and a 1x1 conv (LoRA conv factors are reshaped to 2-D and back)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)))


# a and b adapt different module sets (a module only one of them adapts combines that one) and
# embeddings; b uses rsLoRA. Equal ranks, so every method applies.
SETUPS = {
    "llama": (tiny_llama, {
        "a": lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "b": lk.LoraConfig(r=4, lora_alpha=5, use_rslora=True, target_modules=["v_proj", "o_proj", "embed_tokens"]),
    }),
    "gpt2": (tiny_gpt2, {   # Conv1D: weights stored (d_in, d_out)
        "a": lk.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
        "b": lk.LoraConfig(r=4, lora_alpha=2, target_modules=["c_attn", "c_fc"]),
    }),
    "conv": (ConvNet, {
        "a": lk.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "proj"]),
        "b": lk.LoraConfig(r=2, lora_alpha=3, target_modules=["conv"]),
    }),
    "ranks": (tiny_llama, {   # different ranks: cat and the svd methods only
        "a": lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": lk.LoraConfig(r=6, lora_alpha=5, target_modules=["v_proj", "o_proj"], rank_pattern={"o_proj": 3}),
    }),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """setup -> (build, adapter names, their directories), each setup's adapters written once."""
    cache = {}

    def get(setup: str) -> tuple:
        if setup not in cache:
            build, configs = SETUPS[setup]
            model, root, dirs = build(), tmp_path_factory.mktemp(setup), {}
            for seed, (name, config) in enumerate(configs.items()):
                lk.add_adapter(model, config, name=name)
                randomise(model, name, seed)
                dirs[name] = root / name
                lk.save_adapter(model, dirs[name], name)
            cache[setup] = build, list(configs), dirs
        return cache[setup]

    return get


def _lorakit_model(build, names, dirs) -> nn.Module:
    model = build()
    for n in names:
        lk.load_adapter(model, dirs[n], name=n, activate=False)
    return model


def _peft_combined(build, names, dirs, weights, method, monkeypatch, **opts) -> PeftModel:
    model = PeftModel.from_pretrained(build(), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(dirs[n], adapter_name=n)
    if "seed" in opts:   # PEFT draws DARE masks from the global RNG once the new adapter is injected
        import peft.tuners.lora.model as lora_model

        freeze = lora_model._freeze_adapter

        def freeze_then_seed(*args, **kwargs):
            freeze(*args, **kwargs)
            torch.manual_seed(opts["seed"])

        monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT warns about density 1 and missing LoRAs per module
        model.add_weighted_adapter(names, weights, "ab", combination_type=method, density=opts.get("density"),
                                   svd_rank=opts.get("svd_rank"),
                                   majority_sign_method=opts.get("majority_sign", "total"))
    model.set_adapter("ab")
    return model


def _inputs(setup: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if setup == "conv":
        return torch.randn(2, 3, 6, 6, generator=gen)
    return torch.randint(3, 100, (2, 9), generator=gen)


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _cases():
    """Every method on Llama (Linear and embedding layers), GPT-2 (Conv1D) and convolutions; then
    the frequency sign election, explicit svd ranks, and adapters of different ranks."""
    for setup in ("llama", "gpt2", "conv"):
        for method in METHODS:
            yield setup, method, {}
    yield "llama", "ties", {"majority_sign": "frequency"}
    yield "llama", "dare_ties_svd", {"majority_sign": "frequency", "svd_rank": 3}
    for method in ("cat", "svd", "ties_svd", "dare_linear_svd"):
        yield "ranks", method, {}
    yield "ranks", "svd", {"svd_rank": 3}


@pytest.mark.parametrize("setup, method, extra", list(_cases()),
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_matches_peft_add_weighted_adapter(setup, method, extra, saved, monkeypatch):
    build, names, dirs = saved(setup)
    weights = [0.7, -0.4]
    opts = {**_options(method), **extra}
    ours = lk.combine_adapters(_lorakit_model(build, names, dirs), names, weights, method, "ab", **opts)
    theirs = _peft_combined(build, names, dirs, weights, method, monkeypatch, **opts)

    peft_layers = dict(theirs.base_model.model.named_modules())
    held = {m: layer for m, layer in lora_layers(ours) if "ab" in layer.r}
    assert sorted(held) == sorted(m for m, layer in lora_layers(ours) if set(names) & set(layer.r))
    for module_name, layer in held.items():
        assert layer.scaling["ab"] == 1.0
        torch.testing.assert_close(layer.delta_weight("ab"), peft_layers[module_name].get_delta_weight("ab"),
                                   atol=ATOL, rtol=0, msg=lambda m, n=module_name: f"{n}: {m}")
    x = _inputs(setup)
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), atol=ATOL, rtol=0)
    if method in SEEDED:   # the seed matters: another one draws other masks
        other = lk.combine_adapters(_lorakit_model(build, names, dirs), names, weights, method, "ab",
                                    **{**opts, "seed": 4})
        assert not torch.allclose(_out(other, x), _out(ours, x), atol=ATOL)


# ---- closed forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_one_adapter_with_weight_one_is_itself(method, saved):
    """Every method reproduces a lone adapter with weight 1, the pruning ones at density 1 (below
    it they prune: see the next test). svd: its default rank is the adapter's, so nothing is cut."""
    build, names, dirs = saved("llama")
    model = _lorakit_model(build, names, dirs)
    lk.combine_adapters(model, ["b"], [1.0], method, "solo", **_options(method, density=1.0))
    for module_name, layer in lora_layers(model):
        if "b" in layer.r:
            assert layer.r["solo"] == layer.r["b"]
            torch.testing.assert_close(layer.delta_weight("solo"), layer.delta_weight("b"), atol=ATOL, rtol=0)
        else:
            assert "solo" not in layer.r, module_name


def test_one_adapter_below_density_one_is_pruned(saved):
    """Unlike PEFT (which switches a single adapter to `linear`), the method is applied: TIES keeps
    floor(density * numel) entries of each factor."""
    build, names, dirs = saved("llama")
    model = _lorakit_model(build, names, dirs)
    lk.combine_adapters(model, ["a"], [1.0], "ties", "solo", density=0.25)
    layer = model.model.layers[0].self_attn.q_proj
    for factor in (layer.lora_A["solo"].weight, layer.lora_B["solo"].weight):
        assert (factor != 0).sum().item() == int(0.25 * factor.numel())


@pytest.mark.parametrize("setup", ["llama", "gpt2", "conv", "ranks"])
def test_cat_output_is_the_weighted_sum_of_outputs(setup, saved):
    build, names, dirs = saved(setup)
    weights = [0.7, -0.4]
    model = lk.combine_adapters(_lorakit_model(build, names, dirs), names, weights, "cat", "ab")
    gen = torch.Generator().manual_seed(2)
    for module_name, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.r]
        assert layer.r["ab"] == sum(layer.r[n] for n, _ in present), module_name
        base = layer.base_layer
        if isinstance(base, nn.Embedding):
            x = torch.randint(0, base.num_embeddings, (3, 5), generator=gen)
        elif isinstance(base, nn.Conv2d):
            x = torch.randn(2, base.in_channels, 6, 6, generator=gen)
        else:
            x = torch.randn(3, 5, layer.in_features, generator=gen)

        def out(active, layer=layer, x=x):
            layer.active_adapters = active
            with torch.no_grad():
                return layer(x)

        y0 = out([])
        expected = y0 + sum(w * (out([n]) - y0) for n, w in present)
        torch.testing.assert_close(out(["ab"]), expected, atol=ATOL, rtol=0, msg=lambda m, n=module_name: f"{n}: {m}")


@pytest.mark.parametrize("setup, svd_rank", [("llama", None), ("gpt2", 3), ("conv", None), ("ranks", 20)])
def test_svd_equals_dense_truncated_svd(setup, svd_rank, saved):
    build, names, dirs = saved(setup)
    weights = [0.7, -0.4]
    model = lk.combine_adapters(_lorakit_model(build, names, dirs), names, weights, "svd", "ab", svd_rank=svd_rank)
    k = svd_rank or max(SETUPS[setup][1][n].r for n in names)

    def as_pq(layer, delta):   # (d_out, d_in) / (dim, vocab) / (c_out, c_in * kh * kw), the shape of B A
        flipped = getattr(layer, "fan_in_fan_out", False) or isinstance(layer.base_layer, nn.Embedding)
        return delta.t() if flipped else delta.flatten(1)

    for module_name, layer in lora_layers(model):
        dense = sum(w * as_pq(layer, layer.delta_weight(n)).double()
                    for n, w in zip(names, weights, strict=True) if n in layer.r)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        assert layer.r["ab"] == k
        torch.testing.assert_close(as_pq(layer, layer.delta_weight("ab")).double(), (U[:, :k] * S[:k]) @ Vh[:k],
                                   atol=ATOL, rtol=0, msg=lambda m, n=module_name: f"{n}: {m}")


def test_refactor_without_the_dense_product():
    """QR of the stacked factors + SVD of the small core = SVD of B A, also when the stacked rank
    exceeds a side (reduced QR) and when fewer singular values exist than asked for (zero padding)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 7, generator=gen, dtype=torch.float64)    # R=12 > q=7
    B = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(B @ A)
    for k in (3, 7):
        A2, B2 = _refactor(A, B, k)
        torch.testing.assert_close(B2 @ A2, (U[:, :k] * S[:k]) @ Vh[:k])
        torch.testing.assert_close(torch.linalg.norm(B2, dim=0), S[:k])          # B' = U_k S_k
        torch.testing.assert_close(A2 @ A2.t(), torch.eye(k, dtype=A.dtype))       # A' = V_k^T
    A2, B2 = _refactor(A, B, 10)
    assert A2.shape == (10, 7) and B2.shape == (9, 10)
    assert A2[7:].abs().max() == 0 and B2[:, 7:].abs().max() == 0
    torch.testing.assert_close(B2 @ A2, B @ A)


def test_combined_adapter_is_a_normal_adapter(saved, tmp_path):
    """Saved in PEFT's format with scaling 1 and per-module ranks (rank_pattern), it loads in lorakit
    and PEFT with the same logits, and merges."""
    build, names, dirs = saved("llama")
    model = lk.combine_adapters(_lorakit_model(build, names, dirs), names, [0.7, 0.3], "cat", "ab")
    ids = _inputs("llama")
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path / "ab", "ab")
    config = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)   # q_proj: a alone
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.v_proj": 8, r"model\.layers\.1\.self_attn\.v_proj": 8,
                                      "model\\.embed_tokens": 8}
    assert config["alpha_pattern"] == config["rank_pattern"]

    fresh = lk.load_adapter(build(), tmp_path / "ab")
    torch.testing.assert_close(_out(fresh, ids), expected, atol=ATOL, rtol=0)
    peft = PeftModel.from_pretrained(build(), tmp_path / "ab")
    torch.testing.assert_close(_out(peft, ids), expected, atol=ATOL, rtol=0)
    lk.merge_adapters(fresh)
    torch.testing.assert_close(_out(fresh, ids), expected, atol=ATOL, rtol=0)
    assert not lk.get_adapter_config(model, "ab").use_rslora
    assert lk.active_adapters(model) == ["ab"]


# ---- errors --------------------------------------------------------------------------------------


def _two(configs=None) -> nn.Module:
    model = tiny_llama(attention_bias=True)   # biases, for lora_bias
    configs = configs or {"a": lk.LoraConfig(r=4, target_modules=["q_proj"]), "b": lk.LoraConfig(r=4, target_modules=["q_proj"])}
    for name, config in configs.items():
        lk.add_adapter(model, config, name=name)
    return model


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((["a", "b"], [1, 1], "mean", "ab"), {}, lk.ConfigError,
     "method 'mean' is not a combination method; choose one of linear, cat, svd, ties, ties_svd, dare_linear, "
     "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd"),
    ((["a", "b"], [1], "cat", "ab"), {}, lk.ConfigError, "got 1 weights for 2 adapters; give one weight per adapter"),
    ((["a", "b"], [1, float("nan")], "cat", "ab"), {}, lk.ConfigError, "weights must be finite numbers, got [1, nan]"),
    (([], [], "cat", "ab"), {}, lk.ConfigError, "names is empty; give at least one adapter to combine"),
    ((["a", "b"], [1, 1], "ties", "ab"), {}, lk.ConfigError,
     "method 'ties' needs density, the fraction of entries kept, in (0, 1]"),
    ((["a", "b"], [1, 1], "dare_linear", "ab"), {"density": 0.0}, lk.ConfigError,
     "density must be a number in (0, 1] (the fraction of entries kept), got 0.0"),
    ((["a", "b"], [1, 1], "linear", "ab"), {"density": 0.5}, lk.ConfigError,
     "density is only used by ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
     "magnitude_prune, magnitude_prune_svd; method 'linear' keeps every entry, so drop it"),
    ((["a", "b"], [1, 1], "ties", "ab"), {"density": 0.5, "majority_sign": "sum"}, lk.ConfigError,
     "majority_sign must be 'total' or 'frequency', got 'sum'"),
    ((["a", "b"], [1, 1], "dare_linear", "ab"), {"density": 0.5, "majority_sign": "frequency"}, lk.ConfigError,
     "majority_sign is only used by ties, ties_svd, dare_ties, dare_ties_svd; method 'dare_linear' elects no "
     "sign, so drop it"),
    ((["a", "b"], [1, 1], "cat", "ab"), {"svd_rank": 4}, lk.ConfigError,
     "svd_rank is only used by svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd; the rank of "
     "'cat' follows from the inputs, so drop it"),
    ((["a", "b"], [1, 1], "svd", "ab"), {"svd_rank": 0}, lk.ConfigError, "svd_rank must be an integer >= 1, got 0"),
    ((["a", "b"], [1, 1], "ties", "ab"), {"density": 0.5, "seed": 1}, lk.ConfigError,
     "seed is only used by dare_linear, dare_ties, dare_linear_svd, dare_ties_svd (random DARE masks); method "
     "'ties' is deterministic, so drop it"),
    ((["a", "a"], [1, 1], "cat", "ab"), {}, lk.ConfigError,
     "names lists adapter 'a' twice; give each adapter once (add up its weights)"),
    ((["a", "c"], [1, 1], "cat", "ab"), {}, lk.AdapterStateError, "no adapter named 'c'; adapters on this model: ['a', 'b']"),
    ((["a", "b"], [1, 1], "cat", "b"), {}, lk.AdapterStateError,
     "an adapter named 'b' already exists; pick another name or delete_adapter it first"),
])
def test_argument_errors(args, kwargs, error, message):
    model = _two()
    with pytest.raises(error) as info:
        lk.combine_adapters(model, *args, **kwargs)
    assert str(info.value) == message
    assert lk.list_adapters(model) == ["a", "b"]


def test_factor_methods_need_equal_ranks_per_module():
    model = _two({"a": lk.LoraConfig(r=4, target_modules=["q_proj"]),
                  "b": lk.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})})
    for method in ("linear", "ties"):
        with pytest.raises(lk.AdapterStateError) as info:
            lk.combine_adapters(model, ["a", "b"], [1, 1], method, "ab", **_options(method))
        assert str(info.value) == (
            f"method {method!r} combines the factors entry by entry, so the adapters need the same rank at each "
            "module, but model.layers.0.self_attn.q_proj has ranks {'a': 4, 'b': 8}; use 'cat' (exact) or an "
            "*_svd method")
    lk.combine_adapters(model, ["a", "b"], [1, 1], "svd", "ab")     # the svd methods take any ranks
    assert lk.list_adapters(model) == ["a", "b", "ab"]


@pytest.mark.parametrize("config, message", [
    (lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
     "adapter 'b' uses DoRA, whose magnitude vector rescales whole rows of W + sBA and does not add across "
     "adapters, so it cannot be combined; merge it into the base (merge_adapters) instead"),
    (lk.LoraConfig(r=4, target_modules=["o_proj"], lora_bias=True),
     "adapter 'b' has lora_bias=True; combining B biases is not supported, combine adapters without lora_bias"),
    (lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
     "adapter 'b' has modules_to_save ['lm_head']; fully trained module copies cannot be combined like low-rank "
     "updates, combine adapters without modules_to_save"),
    (lk.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"),
     "adapter 'b' trains base biases (bias='lora_only'), which are shared by every adapter and cannot be "
     "weighted; combine adapters trained with bias='none'"),
])
def test_adapters_that_cannot_be_combined(config, message):
    model = _two({"a": lk.LoraConfig(r=4, target_modules=["q_proj"]), "b": config})
    with pytest.raises(lk.AdapterStateError) as info:
        lk.combine_adapters(model, ["a", "b"], [1, 1], "svd", "ab")
    assert str(info.value) == message


def test_merged_inputs_combine_but_the_result_is_not_activated_over_them():
    model = _two()
    lk.set_active_adapters(model, ["a"])
    lk.merge_adapters(model, ["a"])
    with pytest.raises(lk.AdapterStateError) as info:
        lk.combine_adapters(model, ["a", "b"], [1, 1], "cat", "ab")
    assert str(info.value) == "adapters ['a'] are merged into the base weights; unmerge_adapters before deactivating them"
    assert lk.list_adapters(model) == ["a", "b"]        # nothing half done
    lk.combine_adapters(model, ["a", "b"], [0.5, 2.0], "cat", "ab", activate=False)
    layer = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(layer.delta_weight("ab"), 0.5 * layer.delta_weight("a") + 2 * layer.delta_weight("b"))
    assert lk.active_adapters(model) == ["a"]
    assert not any(p.requires_grad for p in layer.adapter_parameters("ab").values())   # trainable=False


def test_nested_module_names_are_refused():
    """A target list entry also matches any module whose path ends with it; the combined adapter
    must not silently grow onto such a module."""
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.sub = nn.Module()
            self.sub.lin = nn.Linear(4, 4)

    model = Nested()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="lin"), name="a")   # regex: the root `lin` only
    with pytest.raises(lk.TargetModulesError) as info:
        lk.combine_adapters(model, ["a"], [1.0], "cat", "ab")
    assert str(info.value) == (
        "the combined adapter's target_modules ['lin'] also match ['sub.lin'] (a module path that ends with "
        "another's), so it cannot be saved as a PEFT target list; combine adapters on a model without such "
        "nested names")
    assert lk.list_adapters(model) == ["a"]


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_combine_round_trip(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    _, configs = SETUPS["llama"]
    model = tiny_llama()
    for seed, (name, config) in enumerate(configs.items()):
        config = lk.LoraConfig(**{**config.__dict__, "base_model_name_or_path": str(base_dir)})
        lk.add_adapter(model, config, name=name)
        randomise(model, name, seed)
        lk.save_adapter(model, tmp_path / name, name)
    out = tmp_path / "ties"
    argv = ["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7", "-0.3", "--method", "ties",
            "--density", "0.5", "--majority-sign", "frequency", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"combined adapter (ties) written to {out}/\n"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    ids = _inputs("llama")
    reference = lk.combine_adapters(_lorakit_model(tiny_llama, ["a", "b"], {n: tmp_path / n for n in "ab"}),
                                    ["a", "b"], [0.7, -0.3], "ties", "ab", density=0.5, majority_sign="frequency")
    loaded = lk.load_adapter(tiny_llama(), out)
    torch.testing.assert_close(_out(loaded, ids), _out(reference, ids), atol=ATOL, rtol=0)
    peft = PeftModel.from_pretrained(tiny_llama(), out)
    torch.testing.assert_close(_out(peft, ids), _out(loaded, ids), atol=ATOL, rtol=0)
    assert lk.read_adapter_config(out).base_model_name_or_path == str(base_dir)

    # bad options fail before any model is loaded; an existing output is never overwritten
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "1", "--method", "linear",
                 "--density", "0.5", "--out", str(tmp_path / "new")]) == 2
    assert "density is only used by" in capsys.readouterr().err
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"lorakit combine: error: {out} exists and is not an empty directory; "
                                       "remove it or choose another --out\n")
