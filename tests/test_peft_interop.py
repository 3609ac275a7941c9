"""Adapters move both ways between lorakit and PEFT with identical numerics.

PEFT is the reference implementation of the file format and the LoRA math (DESIGN.md, "The LoRA
math" and "PEFT file format"). For each case below the same config is built in both tools on
copies of one seeded tiny model, and the tests check that

  - an adapter trained in lorakit and saved with `lk.save_adapter` loads in PEFT
    (`PeftModel.from_pretrained`) and gives the same logits, and the other way round
    (`get_peft_model` + `save_pretrained` -> `lk.load_adapter`);
  - lorakit counts exactly the parameters PEFT counts, prints PEFT's summary line, and makes the
    same parameters trainable;
  - lorakit writes the same safetensors keys and shapes as PEFT, and an adapter_config.json that
    PEFT reads as the same config;
  - several adapters in one directory load per adapter (and summed) in the other tool;
  - merging gives the same weights as PEFT's `merge_and_unload`.

Everything runs on tiny models (fp32, CPU); tolerances are absolute 1e-5.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model

import lorakit as lk
from lorakit.layers import LoraLayer, ModulesToSave

VOCAB = 96
ATOL = 1e-5
PEFT_PREFIX = "base_model.model."

# PEFT saves the base weight of a targeted embedding layer next to the adapter (for resized
# vocabularies) and says so; expected in the embedding cases, nowhere else.
_EMBEDDING_SAVE_WARNING = r"ignore:Setting `save_embedding_layers` to `True`:UserWarning"


# ---- tiny models ------------------------------------------------------------------------------


# the tiny models of tiny_models.py at vocab 96: Llama, Mistral, Qwen2 (q/k/v projections carry
# biases) with a separate head and no padding row; GPT-2 (Conv1D layers, weight stored (d_in, d_out),
# biases, tied lm_head) without its dropouts
_CONFIGS = {
    "llama": dict(tie=False, pad_token_id=None),
    "mistral": dict(tie=False, pad_token_id=None),
    "qwen2": dict(tie=False, pad_token_id=None),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


@functools.cache
def _template(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, seed=1234, vocab=VOCAB, training=True, **_CONFIGS[arch])
    # Default init (std 0.02) leaves the tiny model's logits almost flat; spread the weights so
    # that differences between the adapters show clearly against the 1e-5 tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def fresh_base(arch: str) -> torch.nn.Module:
    """An independent copy of the seeded base model of `arch` (identical weights every time)."""
    return copy.deepcopy(_template(arch))


_EVAL_IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(99))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(input_ids=_EVAL_IDS).logits.detach().clone()


def train_a_few_steps(model: torch.nn.Module, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps of next-token training on seeded random tokens: moves every trainable
    tensor (A, B, magnitudes, lora biases, copies, base biases) away from its init through the
    backward pass of the tool that owns the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def assert_nontrivial(adapted: torch.Tensor, arch: str) -> None:
    """The adapter really changes the output, so an equality check against it means something."""
    diff = (adapted - logits(fresh_base(arch))).abs().max().item()
    assert diff > 1e-2, f"adapter barely changes the logits (max diff {diff:.2e}); the comparison would be vacuous"


def assert_logits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def file_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype in a saved adapter, read from the safetensors header."""
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def file_metadata(directory: Path) -> dict[str, str] | None:
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        return f.metadata()


def lorakit_wrappers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


# ---- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    arch: str
    config: dict[str, Any]
    """Keyword arguments, identical for `lk.LoraConfig` and `peft.LoraConfig`."""
    peft_extra_keys: frozenset[str] = frozenset()
    """Keys PEFT writes by default that lorakit does not (and accepts on load)."""

    def lorakit_model(self, **kwargs: Any) -> torch.nn.Module:
        model = fresh_base(self.arch)
        lk.add_adapter(model, lk.LoraConfig(**self.config), **kwargs)
        return model

    def peft_model(self) -> peft.PeftModel:
        return peft.get_peft_model(fresh_base(self.arch), peft.LoraConfig(**self.config))


_EMBED_BASE_KEY = frozenset({PEFT_PREFIX + "model.embed_tokens.base_layer.weight"})

CASES = {
    "llama-all-linear": Case("llama", dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")),
    "gpt2-conv1d": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                     fan_in_fan_out=True)),
    "llama-rank-alpha-pattern": Case("llama", dict(
        r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 4, "layers.1.self_attn.v_proj": 2}, alpha_pattern={"down_proj": 16},
    )),
    "llama-rslora": Case("llama", dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"])),
    "llama-dora": Case("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")),
    "gpt2-dora": Case("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                                   fan_in_fan_out=True)),
    "llama-embedding": Case("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                            peft_extra_keys=_EMBED_BASE_KEY),
    "llama-modules-to-save": Case("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                modules_to_save=["lm_head"])),
    "gpt2-lora-bias": Case("gpt2", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["c_attn", "c_fc"],
                                        fan_in_fan_out=True)),
    "gpt2-bias-all": Case("gpt2", dict(r=4, lora_alpha=8, bias="all", target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-bias-lora-only": Case("gpt2", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True)),
    "mistral-all-linear": Case("mistral", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "qwen2-lora-bias-lora-only": Case("qwen2", dict(r=4, lora_alpha=8, lora_bias=True, bias="lora_only",
                                                    target_modules=["q_proj", "k_proj", "v_proj"])),
}

# PEFT's save-time shape check (meant for unsharded ZeRO-3 / FSDP tensors) mistakes the 1-D
# `lora_B.bias` of lora_bias=True for a broken tensor and warns; the file is fine.
_LORA_BIAS_SHAPE_WARNING = pytest.mark.filterwarnings(r"ignore:Adapter 'default'. \d+ LoRA tensor\(s\) have invalid shape")


def _param(name: str) -> Any:
    marks = [_LORA_BIAS_SHAPE_WARNING] if CASES[name].config.get("lora_bias") else []
    return pytest.param(CASES[name], id=name, marks=marks)


ALL_CASES = [_param(name) for name in CASES]
MERGE_CASES = [_param(name) for name in (
    "llama-all-linear", "gpt2-conv1d", "llama-rank-alpha-pattern", "llama-dora", "gpt2-dora",
    "llama-embedding", "llama-modules-to-save", "gpt2-lora-bias", "qwen2-lora-bias-lora-only",
)]


# ---- 1 and 2: numerics in both directions ------------------------------------------------------


@pytest.mark.filterwarnings(_EMBEDDING_SAVE_WARNING)
@pytest.mark.parametrize("case", ALL_CASES)
def test_lorakit_adapter_loads_in_peft_with_identical_logits(case: Case, tmp_path: Path) -> None:
    model = case.lorakit_model()
    train_a_few_steps(model)
    expected = logits(model)
    assert_nontrivial(expected, case.arch)
    lk.save_adapter(model, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(fresh_base(case.arch), tmp_path).eval()

    assert_logits_equal(logits(peft_model), expected)


@pytest.mark.filterwarnings(_EMBEDDING_SAVE_WARNING)
@pytest.mark.parametrize("case", ALL_CASES)
def test_peft_adapter_loads_in_lorakit_with_identical_logits(case: Case, tmp_path: Path) -> None:
    peft_model = case.peft_model()
    train_a_few_steps(peft_model)
    expected = logits(peft_model)
    assert_nontrivial(expected, case.arch)
    peft_model.save_pretrained(tmp_path)

    model = fresh_base(case.arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.load_adapter(model, tmp_path)
    assert [str(w.message) for w in caught] == [], "PEFT's adapter_config.json should load without warnings"

    assert_logits_equal(logits(model), expected)
    # lorakit adapted the same layers with the same per-layer rank and scaling as PEFT
    peft_layers = {n.removeprefix(PEFT_PREFIX): (m.r["default"], pytest.approx(m.scaling["default"], rel=1e-12))
                   for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    lk_layers = {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules()
                 if isinstance(m, LoraLayer)}
    assert lk_layers == peft_layers


# ---- 3: parameter counts -----------------------------------------------------------------------


def _trainable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Trainable parameter names, with PEFT's naming differences normalised away."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix(PEFT_PREFIX)
            name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.default")
            out[name] = tuple(p.shape)
    return out


@pytest.mark.parametrize("case", ALL_CASES)
def test_parameter_counts_and_summary_match_peft(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    model = case.lorakit_model()
    peft_model = case.peft_model()

    trainable, total = lk.trainable_parameters(model)
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    assert total == sum(p.numel() for p in model.parameters())

    capsys.readouterr()
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    assert lk.trainable_summary(model) == printed

    # not only the same number: the same tensors train
    assert _trainable_shapes(model) == _trainable_shapes(peft_model)


# ---- 4: the files --------------------------------------------------------------------------------


@pytest.mark.filterwarnings(_EMBEDDING_SAVE_WARNING)
@pytest.mark.parametrize("case", ALL_CASES)
def test_saved_tensors_have_peft_keys_and_shapes(case: Case, tmp_path: Path) -> None:
    lk.save_adapter(case.lorakit_model(), tmp_path / "lorakit")
    case.peft_model().save_pretrained(tmp_path / "peft")

    ours, theirs = file_shapes(tmp_path / "lorakit"), file_shapes(tmp_path / "peft")
    assert set(theirs) - set(ours) == case.peft_extra_keys
    assert ours == {k: v for k, v in theirs.items() if k not in case.peft_extra_keys}
    assert all(k.startswith(PEFT_PREFIX) for k in ours)
    assert file_metadata(tmp_path / "lorakit") == {"format": "pt"}
    assert sorted(p.name for p in (tmp_path / "lorakit").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]


def test_saved_tensors_equal_peft_exactly_without_embedding_base_weights(tmp_path: Path) -> None:
    case = CASES["llama-embedding"]
    lk.save_adapter(case.lorakit_model(), tmp_path / "lorakit")
    case.peft_model().save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert file_shapes(tmp_path / "lorakit") == file_shapes(tmp_path / "peft")


_CONFIG_FIELDS = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "exclude_modules", "bias", "fan_in_fan_out",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "use_rslora", "use_dora", "lora_bias", "inference_mode", "task_type",
)


@pytest.mark.filterwarnings(_EMBEDDING_SAVE_WARNING)
@pytest.mark.parametrize("case", ALL_CASES)
def test_written_config_reads_in_peft_as_peft_own(case: Case, tmp_path: Path) -> None:
    lk.save_adapter(case.lorakit_model(), tmp_path / "lorakit")
    case.peft_model().save_pretrained(tmp_path / "peft")

    raw = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA"
    generic = peft.PeftConfig.from_pretrained(tmp_path / "lorakit")
    assert isinstance(generic, peft.LoraConfig)
    ours = peft.LoraConfig.from_pretrained(tmp_path / "lorakit")
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "peft")
    for name in _CONFIG_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(generic, name) == getattr(theirs, name), name
    assert set(ours.target_modules) == set(theirs.target_modules)
    # and what the user asked for, as lorakit resolved it
    resolved = lk.read_adapter_config(tmp_path / "lorakit")
    assert resolved.r == case.config["r"] and resolved.lora_alpha == case.config["lora_alpha"]
    if case.config["target_modules"] != "all-linear":
        assert set(ours.target_modules) == set(case.config["target_modules"])


# ---- 5: several adapters -------------------------------------------------------------------------

_MULTI_ARCH = "llama"
_MULTI_CONFIGS = {
    "default": dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]),
    "other": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
}


def _peft_logits(peft_model: peft.PeftModel, names: str | list[str]) -> torch.Tensor:
    if isinstance(names, str):
        peft_model.set_adapter(names)
    else:  # several active adapters at once live on the tuner
        peft_model.base_model.set_adapter(names)
    return logits(peft_model)


# Several active adapters add their terms. PEFT (in eval, or with dropout 0) computes a DoRA term
# relative to the layer's running output, so an adapter added *before* a DoRA adapter leaks into
# the DoRA term; with the DoRA adapter first, the running output is still W x and PEFT computes
# exactly the sum of independent terms. lorakit's sum does not depend on the order.
_PEFT_SUM_ORDER = ["other", "default"]  # "other" is the DoRA adapter


def test_several_lorakit_adapters_load_in_peft(tmp_path: Path) -> None:
    model = fresh_base(_MULTI_ARCH)
    expected = {}
    for name, kwargs in _MULTI_CONFIGS.items():
        lk.add_adapter(model, lk.LoraConfig(**kwargs), name=name)   # the new one is the only active one
        train_a_few_steps(model)
        expected[name] = logits(model)
    lk.set_active_adapters(model, ["default"])
    assert_logits_equal(logits(model), expected["default"])         # training "other" left "default" alone
    lk.set_active_adapters(model, ["default", "other"])
    expected["both"] = logits(model)
    lk.set_active_adapters(model, ["other", "default"])
    assert_logits_equal(logits(model), expected["both"])
    for key in expected:
        assert_nontrivial(expected[key], _MULTI_ARCH)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    assert not torch.allclose(expected["both"], expected["other"], atol=1e-3)

    lk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()

    peft_model = peft.PeftModel.from_pretrained(fresh_base(_MULTI_ARCH), tmp_path)
    peft_model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    peft_model.eval()
    assert_logits_equal(_peft_logits(peft_model, "other"), expected["other"])
    assert_logits_equal(_peft_logits(peft_model, "default"), expected["default"])
    assert_logits_equal(_peft_logits(peft_model, _PEFT_SUM_ORDER), expected["both"])


def test_several_peft_adapters_load_in_lorakit(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(fresh_base(_MULTI_ARCH), peft.LoraConfig(**_MULTI_CONFIGS["default"]))
    train_a_few_steps(peft_model)
    peft_model.add_adapter("other", peft.LoraConfig(**_MULTI_CONFIGS["other"]))
    peft_model.set_adapter("other")
    train_a_few_steps(peft_model)
    expected = {
        "default": _peft_logits(peft_model, "default"),
        "other": _peft_logits(peft_model, "other"),
        "both": _peft_logits(peft_model, _PEFT_SUM_ORDER),
    }
    for key in expected:
        assert_nontrivial(expected[key], _MULTI_ARCH)
    peft_model.save_pretrained(tmp_path)   # default at the root, other in other/
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    model = fresh_base(_MULTI_ARCH)
    lk.load_adapter(model, tmp_path, name="default")
    lk.load_adapter(model, tmp_path / "other", name="other")
    assert lk.list_adapters(model) == ["default", "other"]
    for key, names in (("default", ["default"]), ("other", ["other"]), ("both", ["default", "other"])):
        lk.set_active_adapters(model, names)
        assert_logits_equal(logits(model), expected[key])


# ---- 6: merging ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings(_EMBEDDING_SAVE_WARNING)
@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_matches_peft_merge_and_unload(case: Case, tmp_path: Path) -> None:
    model = case.lorakit_model()
    train_a_few_steps(model)
    adapted = logits(model)
    lk.save_adapter(model, tmp_path)

    peft_merged = peft.PeftModel.from_pretrained(fresh_base(case.arch), tmp_path).merge_and_unload().eval()

    lk.merge_adapters(model)
    assert_logits_equal(logits(model), adapted)            # merging does not change the function
    plain = lk.unload(model, merge=True)
    assert lorakit_wrappers(plain) == []

    ours, theirs = plain.state_dict(), peft_merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert_logits_equal(logits(plain), logits(peft_merged))
    assert_logits_equal(logits(plain), adapted)
