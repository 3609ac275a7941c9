import math
import re
from typing import get_args

import pytest
import yaml

import lorakit as lk
from lorakit.cli import build_parser
from lorakit.dtypes import DtypeChoice, DtypeName, QuantizeBase
from lorakit.model_io import TORCH_DTYPES
from lorakit.schema import field_docs, from_dict, reference, reference_markdown, to_dict
from lorakit.train.config import DataSection, ModelSection, TrainConfig, TrainingSection, load_config
from lorakit.train.schedule import lr_at


def test_defaults_run_the_builtin_job():
    cfg = load_config(None)
    assert cfg.model.name_or_path == "lorakit/tiny-llama" and cfg.data.train == "lorakit/tiny-tasks"
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (16, 32, "all-linear")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 2e-4\n  micro_batch_size: 2\nlora:\n  r: 4\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(str(path), ["training.lr=1e-3", "data.packing=true", "lora.lora_dropout=0.1"])
    assert cfg.training.lr == 1e-3 and cfg.training.micro_batch_size == 2 and cfg.data.packing is True
    assert cfg.lora.r == 4 and cfg.lora.lora_alpha == 32 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert isinstance(cfg.lora, lk.LoraConfig) and cfg.lora.lora_dropout == 0.1


def test_yaml_float_in_exponent_form_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 3e-4\n")        # a string to YAML 1.1
    assert load_config(str(path)).training.lr == 3e-4


@pytest.mark.parametrize("override, message", [
    (["training.warmup=1"], "unknown config key 'training.warmup'; did you mean 'training.warmup_steps'?"),
    (["lora.rr=4"], "unknown config key 'lora.rr'; did you mean 'lora.r'?"),
    (["trainig.lr=1"], "unknown config key 'trainig'; did you mean 'training'?"),
    (["training.lr=fast"], "training.lr must be float, got 'fast'"),
    (["training.micro_batch_size=0"], "training.micro_batch_size must be >= 1"),
    (["training.schedule=step"], "training.schedule must be one of constant, linear, cosine"),
    (["model.dtype=fp8"], "model.dtype must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["data.format=xml"], "data.format must be one of auto, alpaca, chat, sharegpt, prompt_completion, text"),
    (["lora.r=0"], "LoraConfig.r must be an integer >= 1, got 0"),
    (["training.strategy=tp"], "training.strategy must be one of single, ddp, fsdp, got 'tp'"),
    (["training.kernels=cuda"], "training.kernels must be one of auto, triton, torch, got 'cuda'"),
    (["training.bf16=maybe"], "training.bf16 must be one of true, false, auto, got 'maybe'"),
    (["training.bf16=1"], "training.bf16 must be one of true, false, auto, got 1"),
    (["training"], "override 'training' must look like key.sub=value"),
])
def test_bad_config_values(override, message):
    with pytest.raises(lk.ConfigError, match=re.escape(message)):
        load_config(None, override)


def test_choices_are_checked_on_construction_too():
    with pytest.raises(lk.ConfigError, match=re.escape("training.schedule must be one of constant, linear, cosine")):
        TrainingSection(schedule="step")
    with pytest.raises(lk.ConfigError, match=re.escape("model.dtype must be one of auto, fp32, bf16, fp16")):
        ModelSection(dtype="float32")


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("auto", "auto")])
def test_bf16_is_a_bool_or_auto(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"training:\n  bf16: {text}\n")
    for cfg in (load_config(str(path)), load_config(None, [f"training.bf16={text}"])):
        assert cfg.training.bf16 == expected and type(cfg.training.bf16) is type(expected)


def test_resolved_config_round_trips_through_yaml():
    """The run's config.yaml (the resolved dict, as YAML) reads back as the same dict and the same
    config, so resuming with the same settings compares equal."""
    cfg = load_config(None, ["training.bf16=true", "lora.r=4", "model.dtype=bf16"])
    resolved = to_dict(cfg)
    assert resolved["training"]["bf16"] is True and resolved["lora"]["lora_alpha"] == 32
    saved = yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False))
    assert saved == resolved and from_dict(TrainConfig, saved) == cfg


def test_lora_defaults_are_the_train_configs():
    """YAML without a lora section, an empty one, a partial one and the Python default agree."""
    assert load_config(None).lora == TrainConfig().lora
    assert from_dict(TrainConfig, {"lora": None}).lora == TrainConfig().lora
    partial = from_dict(TrainConfig, {"lora": {"lora_dropout": 0.1}}).lora
    assert (partial.r, partial.lora_alpha, partial.target_modules, partial.lora_dropout) == (16, 32, "all-linear", 0.1)


def test_cli_choices_come_from_the_types():
    assert set(TORCH_DTYPES) == set(get_args(DtypeName))
    parser = build_parser()
    for name in get_args(DtypeName):
        assert parser.parse_args(["merge", "a", "--out", "b", "--dtype", name]).dtype == name
    for name in get_args(QuantizeBase):
        assert parser.parse_args(["merge", "a", "--out", "b", "--quantize-base", name]).quantize_base == name
    for name in get_args(DtypeChoice):
        assert parser.parse_args(["generate", "--dtype", name]).dtype == name
        assert parser.parse_args(["serve", "--model", "m", "--dtype", name]).dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "a", "--out", "b", "--dtype", "auto"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lr: 1\n   micro_batch_size: [\n")
    with pytest.raises(lk.ConfigError, match=re.escape(str(path)) + r":\d+: not valid YAML"):
        load_config(str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_every_field_is_documented():
    for cls in (TrainConfig, ModelSection, DataSection, TrainingSection, lk.LoraConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    keys = [row[0] for row in reference(TrainConfig)]
    assert "training.lr" in keys and "lora.use_dora" in keys and "data.packing" in keys


def test_readme_configuration_reference_is_current():
    """The README's reference table is generated from the dataclasses; regenerate it with
    `python -c 'from lorakit.schema import reference_markdown; from lorakit.train.config import TrainConfig;
    print(reference_markdown(TrainConfig))'` when a field changes."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference_markdown(TrainConfig) in readme


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_schedules_closed_form(kind, expected):
    got = [lr_at(s, total_steps=6, peak=1.0, warmup=2, kind=kind) for s in range(6)]
    assert got == pytest.approx(expected)


def test_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, 10, 3e-4, 0, "cosine") == pytest.approx(3e-4)
    assert lr_at(9, 10, 3e-4, 0, "linear") == pytest.approx(3e-4 * 0.1)
