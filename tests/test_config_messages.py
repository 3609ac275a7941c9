"""What a user who gets a configuration wrong is told, asserted word for word: the key meant by an
unknown one (misspelt, in another section, or another tool's name for it), the input the error
came from (the YAML file or a `key=value` override, on every verb that reads a train config), and
a PEFT `LoraConfig` given to `lk.add_adapter` (converted, or refused naming the PEFT feature)."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from tiny_models import tiny_llama

import lorakit as lk
from lorakit.cli import main
from lorakit.layers import LoraLayer
from lorakit.schema import reference
from lorakit.train.config import OTHER_TOOLS_NAMES, DataSection, TrainConfig, load_config

# ---- the key meant by an unknown key ---------------------------------------------------------

ANOTHER_TOOLS = "is another tool's name for it"


@pytest.mark.parametrize("key, hint", [
    # misspelt: difflib's ratio, within the section
    ("training.epoch", "did you mean 'training.epochs'?"),
    ("training.warmup", "did you mean 'training.warmup_steps'?"),
    ("training.warmup_ratio", "did you mean 'training.warmup_steps'?"),
    ("lora.rr", "did you mean 'lora.r'?"),
    # a word added or dropped: the ratio of these is under difflib's cutoff, their parts match
    ("training.lr_rate", "did you mean 'training.lr'?"),
    ("training.grad", "did you mean 'training.grad_accum'?"),
    # '-' for '_'
    ("training.micro-batch-size", "did you mean 'training.micro_batch_size'?"),
    # a key of another section, or given at the top: where it lives
    ("training.max_seq_len", "did you mean 'data.max_seq_len'?"),
    ("lora.lr", "did you mean 'training.lr'?"),
    ("seed", "did you mean 'training.seed'?"),
    ("micro_batch_size", "did you mean 'training.micro_batch_size'?"),
    ("revision", "did you mean 'model.revision' or 'lora.revision'?"),
    # another tool's name, in its section, in another one, or at the top (axolotl's flat config)
    ("lora.rank", f"did you mean 'lora.r'? (rank {ANOTHER_TOOLS})"),
    ("lora.lora_r", f"did you mean 'lora.r'? (lora_r {ANOTHER_TOOLS})"),
    ("training.learning_rate", f"did you mean 'training.lr'? (learning_rate {ANOTHER_TOOLS})"),
    ("training.learning-rate", f"did you mean 'training.lr'? (learning-rate {ANOTHER_TOOLS})"),
    ("lora.learning_rate", f"did you mean 'training.lr'? (learning_rate {ANOTHER_TOOLS})"),
    ("learning_rate", f"did you mean 'training.lr'? (learning_rate {ANOTHER_TOOLS})"),
    ("training.num_epochs", f"did you mean 'training.epochs'? (num_epochs {ANOTHER_TOOLS})"),
    ("training.gradient_accumulation_steps",
     f"did you mean 'training.grad_accum'? (gradient_accumulation_steps {ANOTHER_TOOLS})"),
    ("training.per_device_train_batch_size",
     f"did you mean 'training.micro_batch_size'? (per_device_train_batch_size {ANOTHER_TOOLS})"),
    ("data.max_seq_length", f"did you mean 'data.max_seq_len'? (max_seq_length {ANOTHER_TOOLS})"),
    ("training.max_seq_length", f"did you mean 'data.max_seq_len'? (max_seq_length {ANOTHER_TOOLS})"),
    ("sequence_len", f"did you mean 'data.max_seq_len'? (sequence_len {ANOTHER_TOOLS})"),
    ("base_model", f"did you mean 'model.name_or_path'? (base_model {ANOTHER_TOOLS})"),
    ("output_dir", f"did you mean 'output.dir'? (output_dir {ANOTHER_TOOLS})"),
    # nothing alike: the section's keys
    ("data.xyz", "valid keys: " + ", ".join(f.name for f in dataclasses.fields(DataSection))),
])
def test_unknown_key_names_the_key_meant(key, hint):
    override = f"{key}=1"
    with pytest.raises(lk.ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override {override!r}: unknown config key {key!r}; {hint}"


def test_every_alias_names_a_key_lorakit_has_and_no_key_of_its_own():
    """A name lorakit has itself, anywhere, needs no alias: the hint finds where it lives."""
    keys = {key for key, *_ in reference(TrainConfig)}
    names = {part for key in keys for part in key.split(".")}
    assert set(OTHER_TOOLS_NAMES.values()) <= keys
    assert not set(OTHER_TOOLS_NAMES) & names
    assert all(name == name.lower() and "-" not in name for name in OTHER_TOOLS_NAMES)   # looked up with '_'


# ---- which input an error comes from ---------------------------------------------------------


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_an_unknown_key_in_the_file_names_the_file(tmp_path):
    path = _write(tmp_path, "learning_rate: 1e-4\n")   # axolotl's flat form
    with pytest.raises(lk.ConfigError) as e:
        load_config(path, ["training.lr=1e-3"])
    assert str(e.value) == (f"{path}: unknown config key 'learning_rate'; did you mean 'training.lr'? "
                            f"(learning_rate {ANOTHER_TOOLS})")


@pytest.mark.parametrize("file, overrides, culprit, message", [
    ("training: {lr: 1e-4}\n", ["training.lr_rate=1e-4"], "override 'training.lr_rate=1e-4'",
     "unknown config key 'training.lr_rate'; did you mean 'training.lr'?"),
    ("training: {lr: 1e-4}\n", ["data.packing=true", "training.micro_batch_size=0"],
     "override 'training.micro_batch_size=0'", "training.micro_batch_size must be >= 1"),
    ("training: {lr: 1e-4}\n", ["training.lr=fast"], "override 'training.lr=fast'",
     "training.lr must be float, got 'fast'"),
    ("training: {kernels: triton}\n", ["training.compile=true"], "override 'training.compile=true'",
     "training.kernels: triton and training.compile: true exclude each other: torch.compile writes its own "
     "Triton kernels for these ops (and lorakit's would break its graphs); keep one, or set training.kernels: auto"),
    ("training: {micro_batch_size: 0}\n", ["training.lr=1e-3"], "{path}", "training.micro_batch_size must be >= 1"),
])
def test_an_error_names_the_file_or_the_override_it_comes_from(tmp_path, file, overrides, culprit, message):
    path = _write(tmp_path, file)
    with pytest.raises(lk.ConfigError) as e:
        load_config(path, overrides)
    assert str(e.value) == f"{culprit.format(path=path)}: {message}"


def test_an_override_may_complete_the_file(tmp_path):
    """The file alone is invalid (offloading needs checkpointing); with the override it is not."""
    path = _write(tmp_path, "training: {offload_activations: true}\n")
    cfg = load_config(path, ["training.gradient_checkpointing=true"])
    assert cfg.training.offload_activations and cfg.training.gradient_checkpointing


@pytest.mark.parametrize("verb", ["train", "plan", "preview-data", "eval"])
def test_every_verb_names_the_override(verb, tmp_path, capsys):
    path = _write(tmp_path, "training: {lr: 1e-4}\n")
    assert main([verb, path, "lora.rank=4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lorakit {verb}: error: override 'lora.rank=4': unknown config key 'lora.rank'; did you mean 'lora.r'? "
        f"(rank {ANOTHER_TOOLS})")


# ---- a PEFT LoraConfig given to add_adapter --------------------------------------------------


@pytest.mark.parametrize("fields", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={r"layers\.1\..*q_proj": 3.0}, use_rslora=True, task_type="CAUSAL_LM"),
    dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True, lora_dropout=0.1),
], ids=["patterns-rslora", "dora-all-linear"])
def test_a_peft_config_is_converted_and_computes_the_same(fields):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    outputs, configs = [], []
    for config in (peft.LoraConfig(init_lora_weights=False, **fields), lk.LoraConfig(init_lora_weights=False,
                                                                                        **fields)):
        model = tiny_llama().eval()
        torch.manual_seed(1)   # the adapters' initial weights (init_lora_weights=False: B random too)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # nothing of PEFT's config is left out
            lk.add_adapter(model, config)
        configs.append(lk.get_adapter_config(model))
        with torch.no_grad():
            outputs.append(model(ids).logits)
    with torch.no_grad():
        base = tiny_llama().eval()(ids).logits
    assert configs[0] == configs[1] and type(configs[0].task_type) is type(configs[1].task_type)
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], base)


def test_a_peft_feature_lorakit_does_not_compute_is_refused_by_name():
    model = tiny_llama()
    with pytest.raises(lk.ConfigError) as e:
        lk.add_adapter(model, peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 1]]))
    assert str(e.value) == ("peft.LoraConfig: layer_replication=[[0, 1]] is a PEFT feature lorakit does not "
                            "implement; the adapter without it would compute something else")
    assert lk.list_adapters(model) == [] and not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("config, message", [
    ({"r": 4}, "config must be a lorakit.LoraConfig (or a peft.LoraConfig), got dict"),
    (type("LoraConfig", (), {"__module__": "othertool.config"})(),   # not PEFT's: named in full
     "config must be a lorakit.LoraConfig (or a peft.LoraConfig), got othertool.config.LoraConfig"),
    (peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
     "peft.IA3Config: peft_type is 'IA3'; lorakit loads LoRA adapters (peft_type 'LORA')"),
])
def test_other_configs_are_refused_by_type(config, message):
    with pytest.raises(lk.LoraError) as e:
        lk.add_adapter(tiny_llama(), config)
    assert str(e.value) == message
