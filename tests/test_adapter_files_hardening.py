"""A hostile or careless adapter file or config cannot hang the loader, poison the model with
NaN / inf, or escape as a raw Python error (issue 14, items 5-7)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import lorakit as lk
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.inject import has_adapters
from lorakit.io import load_adapter_weights, read_adapter_config
from lorakit.schema import load_yaml

# Exponential backtracking in Python's `re` on a ~25-character module name: it would run for
# longer than the universe has existed. A bounded loader refuses it after its time limit.
CATASTROPHIC = r"((.|\w)+)+\d"


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    lk.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


# ---- item 5: a regex cannot hang the loader ---------------------------------------------------

def test_catastrophic_regexes_are_refused_in_bounded_time(saved):
    """Run in a subprocess with a timeout, so that a regression fails the test instead of hanging it."""
    script = textwrap.dedent(f"""
        import json, sys
        from torch import nn
        import lorakit as lk
        from lorakit.errors import ConfigError
        from lorakit.inject import has_adapters

        def model():
            attn = nn.Module()
            attn.q_proj = nn.Linear(4, 4)
            layer = nn.Module()
            layer.self_attn = attn
            root = nn.Module()
            root.layers = nn.ModuleList([layer])
            return root                      # one module: layers.0.self_attn.q_proj

        bad = {CATASTROPHIC!r}
        cases = {{
            "target_modules": dict(target_modules=bad),
            "exclude_modules": dict(target_modules=["q_proj"], exclude_modules=bad),
            "rank_pattern": dict(target_modules=["q_proj"], rank_pattern={{bad: 2}}),
            "alpha_pattern": dict(target_modules=["q_proj"], alpha_pattern={{bad: 2}}),
            "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=bad),
        }}
        for field, kwargs in cases.items():
            m = model()
            try:
                lk.add_adapter(m, lk.LoraConfig(**kwargs))
            except ConfigError as e:
                assert field in str(e) and repr(bad) in str(e), str(e)
                assert not has_adapters(m) or not lk.list_adapters(m), "rolled back"
                print("refused", field)
        # The issue's case: an adapter_config.json written with such a pattern.
        config_file = sys.argv[1] + "/adapter_config.json"
        data = json.load(open(config_file))
        data["target_modules"] = bad
        json.dump(data, open(config_file, "w"))
        from tiny_models import tiny_llama
        try:
            lk.load_adapter(tiny_llama(), sys.argv[1])
        except ConfigError as e:
            assert "target_modules" in str(e), str(e)
            print("refused load_adapter")
    """)
    tests_dir = os.path.dirname(__file__)
    try:
        out = subprocess.run([sys.executable, "-c", script, str(saved)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": tests_dir})
    except subprocess.TimeoutExpired:
        pytest.fail(f"matching {CATASTROPHIC!r} against module names did not finish in 120 s")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == [f"refused {f}" for f in (
        "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern")] + [
        "refused load_adapter"]


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "layers_pattern"])
def test_invalid_regex_names_the_field(field):
    kwargs = {"target_modules": ["q_proj"], "layers_to_transform": [0]} if field == "layers_pattern" else {}
    with pytest.raises(ConfigError, match=rf"LoraConfig.{field} '\(q' is not a valid regex"):
        lk.LoraConfig(**{**kwargs, field: "(q"})


def test_peft_style_regexes_still_match():
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)"), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
                                        exclude_modules=r"model\.layers\.1\..*",
                                        rank_pattern={"q_proj": 3}, alpha_pattern={r"layers\.0\.self_attn\.v_proj": 6}),
                   name="b")
    q0, v0 = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert sorted(lk.list_adapters(model)) == ["a", "b"]
    assert "b" not in model.model.layers[1].self_attn.q_proj.r and "a" in model.model.layers[1].self_attn.q_proj.r
    assert q0.r["b"] == 3 and v0.r["b"] == 2 and v0.scaling["b"] == 3.0


# ---- item 6: NaN / inf and integer tensors are refused -----------------------------------------

@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_alpha_is_refused(value):
    with pytest.raises(ConfigError, match="lora_alpha"):
        lk.LoraConfig(lora_alpha=value)
    with pytest.raises(ConfigError, match=r"alpha_pattern\['q_proj'\]"):
        lk.LoraConfig(alpha_pattern={"q_proj": value})
    with pytest.raises(ConfigError, match=r"rank_pattern\['q_proj'\]"):
        lk.LoraConfig(rank_pattern={"q_proj": value})


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_json_infinity_in_adapter_config_is_refused(saved, field):
    file = saved / "adapter_config.json"
    text = file.read_text()
    data = json.loads(text)
    data[field] = "INF" if field == "lora_alpha" else {"q_proj": "INF"}
    file.write_text(json.dumps(data).replace('"INF"', "Infinity"))    # Python's json reads it back as inf
    with pytest.raises(ConfigError, match=f"adapter_config.json: LoraConfig.{field}.*finite"):
        read_adapter_config(saved)


def _poison(path, value):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"   # NaN queries are masked away
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_tensor_is_refused_unless_allowed(saved, value):
    key = _poison(saved, value)
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match=rf"{key}.*allow_nonfinite=True"):
        lk.load_adapter(model, saved)
    assert not has_adapters(model) or lk.list_adapters(model) == []     # nothing half-loaded
    lk.load_adapter(model, saved, allow_nonfinite=True)
    assert not torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_non_finite_tensor_is_refused_by_load_adapter_weights(saved):
    model = tiny_llama()
    lk.load_adapter(model, saved)
    key = _poison(saved, math.nan)
    with pytest.raises(AdapterFileError, match=key):
        load_adapter_weights(model, saved)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_non_floating_tensor_is_refused(saved, dtype):
    file = saved / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[1]
    tensors[key] = torch.ones_like(tensors[key], dtype=dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=rf"{key} has dtype {dtype}.*floating"):
        lk.load_adapter(tiny_llama(), saved)


# ---- item 7: deep JSON and duplicate YAML keys --------------------------------------------------

def test_deeply_nested_adapter_config_is_an_adapter_file_error(saved):
    depth = 100_000
    file = saved / "adapter_config.json"
    file.write_text('{"peft_type": "LORA", "target_modules": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(AdapterFileError, match="adapter_config.json.*nested"):
        lk.load_adapter(tiny_llama(), saved)


def test_adapter_config_that_is_not_utf8_names_the_file_line_and_byte(saved):
    file = saved / "adapter_config.json"
    raw = b'{"peft_type": "LORA",\n "r": 4, "lora_alpha": 8, "target_modules": ["q\xff"]}'
    file.write_bytes(raw)
    with pytest.raises(AdapterFileError, match=re.escape(
            f"{file}:2: not valid UTF-8 (byte 0xff at byte offset {raw.index(0xff)}); the file must be UTF-8 text")):
        lk.load_adapter(tiny_llama(), saved)


def test_duplicate_yaml_keys_name_the_key_and_line(tmp_path):
    file = tmp_path / "config.yaml"
    file.write_text("training:\n  lr: 0.001\n  steps: 10\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"config.yaml:4: .*duplicate key 'lr'.*line 2"):
        load_yaml(str(file))
    file.write_text("training: {}\nmodel: {}\ntraining: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"config.yaml:3: .*duplicate key 'training'.*line 1"):
        load_yaml(str(file))


def test_yaml_merge_keys_and_distinct_keys_still_load(tmp_path):
    file = tmp_path / "config.yaml"
    file.write_text("base: &b {lr: 0.1, steps: 2}\ntraining:\n  <<: *b\n  lr: 0.5\n")
    assert load_yaml(str(file)) == {"base": {"lr": 0.1, "steps": 2}, "training": {"lr": 0.5, "steps": 2}}


def test_yaml_python_tags_stay_refused(tmp_path):
    file = tmp_path / "config.yaml"
    file.write_text("training: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(file))
