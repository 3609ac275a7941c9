import json
import re

import pytest
import torch
from adapter_support import perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_llama

import lorakit as lk
from lorakit.cli import main as cli_main


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter on the tiny Llama, saved; returns (dir, logits with it, ids)."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(model)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    lk.save_adapter(model, tmp_path / "a")
    return tmp_path / "a", logits, ids


def test_round_trip_is_exact(saved):
    path, logits, ids = saved
    model = tiny_llama()
    lk.load_adapter(model, path)
    assert torch.equal(model(ids).logits, logits)
    assert lk.trainable_parameters(model)[0] == 0          # loaded frozen by default


def test_files_are_pefts_layout(saved):
    path, _, _ = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    assert config["target_modules"] == sorted(f"model.layers.{i}.{m}" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))


def test_load_trainable(saved):
    path, _, _ = saved
    model = tiny_llama()
    lk.load_adapter(model, path, name="x", trainable=True)
    assert lk.trainable_parameters(model)[0] == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert lk.active_adapters(model) == ["x"]


def test_several_adapters_default_at_root_others_in_subfolders(tmp_path, saved):
    path, logits_a, ids = saved
    model = tiny_llama()
    lk.load_adapter(model, path, name="default")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), name="other")
    perturb(model, "other", seed=5)
    logits_other = model(ids).logits
    lk.save_adapter(model, tmp_path / "both")
    assert (tmp_path / "both" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "both" / "other" / "adapter_config.json").is_file()
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "both", name="default")
    lk.load_adapter(fresh, tmp_path / "both" / "other", name="other")
    assert torch.equal(fresh(ids).logits, logits_other)
    lk.set_active_adapters(fresh, "default")
    assert torch.equal(fresh(ids).logits, logits_a)


def test_single_named_adapter_goes_to_the_root(tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]), name="task")
    lk.save_adapter(model, tmp_path / "t", name="task")
    assert (tmp_path / "t" / "adapter_model.safetensors").is_file()


def test_no_temporary_files_left(saved):
    path, _, _ = saved
    assert not [p for p in path.iterdir() if p.name.startswith(".")]


def test_save_unknown_name(tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.LoraError, match=r"no adapter named 'x' to save; adapters on this model: \['default'\]"):
        lk.save_adapter(model, tmp_path, name="x")


def test_loading_pissa_adapter_does_not_rewrite_the_base(tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    lk.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    before = fresh.model.layers[0].self_attn.q_proj.weight.clone()
    lk.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.model.layers[0].self_attn.q_proj.base_layer.weight, before)


def test_load_into_bf16_model(saved):
    path, logits, ids = saved
    model = tiny_llama().to(torch.bfloat16)
    lk.load_adapter(model, path)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    torch.testing.assert_close(model(ids).logits.float(), logits, atol=0.1, rtol=0.05)


# ---- bad input -------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"adapter directory {tmp_path / 'nope'} does not exist")):
        lk.load_adapter(tiny_llama(), tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'adapter_config.json'} not found: an adapter "
                                                          "directory holds adapter_config.json and adapter_model.safetensors")):
        lk.load_adapter(tiny_llama(), tmp_path)


def test_bad_json_names_file_and_line(saved):
    path, _, _ = saved
    (path / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(lk.AdapterFileError, match=re.escape(f"{path / 'adapter_config.json'}:3: not valid JSON")):
        lk.load_adapter(tiny_llama(), path)


def test_missing_weights(saved):
    path, _, _ = saved
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        lk.load_adapter(tiny_llama(), path)


def test_pickle_is_refused_without_unpickling(saved):
    path, _, _ = saved
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(lk.AdapterFileError, match="adapter_model.bin is a pickle, which lorakit never loads"):
        lk.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(saved, damage):
    path, _, _ = saved
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    model = tiny_llama()
    with pytest.raises(lk.AdapterFileError, match=re.escape(f"{f} is truncated or corrupt")):
        lk.load_adapter(model, path)
    assert not hasattr(model, "_lorakit")


def test_missing_keys_are_an_error_and_nothing_stays_loaded(saved):
    path, _, _ = saved
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(lk.AdapterFileError, match=r"does not fit LlamaForCausalLM: missing 1 keys the adapter config "
                                                  r"implies \(base_model.model.model.layers.1.mlp.up_proj.lora_B.weight\)"):
        lk.load_adapter(model, path)
    assert not hasattr(model, "_lorakit") and not any("lora" in n for n, _ in model.named_parameters())


def test_keys_without_peft_prefix_are_an_error(saved):
    path, _, _ = saved
    f = path / "adapter_model.safetensors"
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(lk.AdapterFileError, match=r"keys must start with 'base_model.model.' as PEFT writes them"):
        lk.load_adapter(tiny_llama(), path)


def test_unexpected_key_is_an_error(saved):
    path, _, _ = saved
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(lk.AdapterFileError, match=r"1 keys that match nothing in the model "
                                                  r"\(base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight\)"):
        lk.load_adapter(tiny_llama(), path)


def test_shape_mismatch_names_module_and_both_shapes(saved):
    path, _, _ = saved
    model = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(lk.AdapterFileError, match=r"adapter_model.safetensors: base_model\.model\.model\.layers\.\d\.\S+ "
                                                  r"has shape \(\d+, \d+\) but module model\.layers\.\d\.\S+ expects "
                                                  r"\(\d+, \d+\); the adapter was made for another model or rank"):
        lk.load_adapter(model, path)
    assert not hasattr(model, "_lorakit")


def test_rank_mismatch_message(saved):
    path, _, _ = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lk.AdapterFileError, match=re.escape(
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has shape (4, 64) but module "
            "model.layers.0.mlp.down_proj expects (8, 64); the adapter was made for another model or rank")):
        lk.load_adapter(tiny_llama(), path)


def test_unknown_config_key_warns(saved):
    path, logits, ids = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["future_option"] = True
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    with pytest.warns(UserWarning, match="ignoring unknown keys future_option"):
        lk.load_adapter(model, path)
    assert torch.equal(model(ids).logits, logits)


def test_wrong_model_targets(saved):
    path, _, _ = saved
    with pytest.raises(lk.TargetModulesError, match="matched no module of GPT2LMHeadModel"):
        lk.load_adapter(tiny_gpt2(), path)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_inspect(saved, capsys):
    path, _, _ = saved
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"adapter {path}: r=4 lora_alpha=8" in out and "28 tensors, 4,096 parameters" in out


def test_cli_inspect_missing(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "x")]) == 2
    assert "lorakit inspect: error: adapter directory" in capsys.readouterr().err
