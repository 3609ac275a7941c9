import re
import warnings

import pytest

import lorakit as lk
from lorakit.config import pattern_key


def test_defaults_are_pefts():
    cfg = lk.LoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {} and not cfg.use_dora and not cfg.use_rslora


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "LoraConfig.r must be an integer >= 1, got 0"),
        ({"r": 2.5}, "LoraConfig.r must be an integer >= 1, got 2.5"),
        ({"lora_alpha": 0}, "LoraConfig.lora_alpha must be a number > 0, got 0"),
        ({"lora_alpha": -1.0}, "LoraConfig.lora_alpha must be a number > 0, got -1.0"),
        ({"lora_dropout": 1.0}, "LoraConfig.lora_dropout must be in [0, 1), got 1.0"),
        ({"lora_dropout": -0.1}, "LoraConfig.lora_dropout must be in [0, 1), got -0.1"),
        ({"bias": "some"}, "LoraConfig.bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"init_lora_weights": "pisa"}, "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', "
                                        "'pissa_niter_N' (N an integer) or 'olora', got 'pisa'"),
        ({"target_modules": "q_proj("}, "LoraConfig.target_modules 'q_proj(' is not a valid regex"),
        ({"exclude_modules": 3}, "LoraConfig.exclude_modules must be a regex string or a list of module names"),
        ({"rank_pattern": {"q_proj": 0}}, "LoraConfig.rank_pattern['q_proj'] must be an integer >= 1, got 0"),
        ({"rank_pattern": {"[": 4}}, "LoraConfig.rank_pattern key '[' is not a valid regex"),
        ({"alpha_pattern": {"v_proj": -2}}, "LoraConfig.alpha_pattern['v_proj'] must be a number > 0, got -2"),
        ({"target_modules": "q_proj", "layers_to_transform": [0]}, "LoraConfig.layers_to_transform needs target_modules as a list"),
        ({"target_modules": ["q_proj"], "layers_to_transform": [-1]}, "LoraConfig.layers_to_transform must be a layer index"),
        ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "LoraConfig.layers_pattern is only used with layers_to_transform"),
        ({"modules_to_save": "lm_head"}, "LoraConfig.modules_to_save must be a list of module names"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(lk.ConfigError, match=re.escape(message)):
        lk.LoraConfig(**kwargs)


def test_config_error_is_a_value_error():
    assert issubclass(lk.ConfigError, lk.LoraError) and issubclass(lk.LoraError, ValueError)


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4", "olora"])
def test_valid_inits(init):
    assert lk.LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_sets_and_tuples_become_lists():
    cfg = lk.LoraConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=(0, 1))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.layers_to_transform == [0, 1]


def test_pattern_key_is_dot_bounded_suffix_first_match_wins():
    keys = ["q_proj", "layers.1.self_attn.q_proj", "proj"]
    assert pattern_key(keys, "model.layers.1.self_attn.q_proj") == "q_proj"
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj") == "layers.1.self_attn.q_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None   # "proj" is not dot-bounded
    assert pattern_key(["proj"], "proj") == "proj"


def test_per_module_rank_alpha_and_scaling():
    cfg = lk.LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"o_proj": 2})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 4
    assert cfg.scaling_for("model.layers.0.self_attn.o_proj") == 2 / 8
    assert cfg.scaling_for("model.layers.0.mlp.up_proj") == 2.0
    rs = lk.LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("x") == pytest.approx(8 / 4)


def test_peft_dict_round_trip():
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"q": 2}, use_dora=True)
    data = cfg.to_peft_dict()
    assert data["peft_type"] == "LORA"
    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "fan_in_fan_out",
            "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
            "alpha_pattern", "use_rslora", "use_dora", "lora_bias", "task_type", "base_model_name_or_path",
            "revision", "inference_mode"} <= set(data)
    assert lk.LoraConfig.from_peft_dict(data) == cfg


def test_from_peft_dict_requires_lora_type():
    with pytest.raises(lk.ConfigError, match="peft_type is 'IA3'; lorakit loads LoRA adapters"):
        lk.LoraConfig.from_peft_dict({"peft_type": "IA3", "r": 4})


def test_from_peft_dict_warns_on_unknown_keys_and_ignores_pefts_off_features():
    data = {"peft_type": "LORA", "r": 4, "peft_version": "0.21.2", "eva_config": None, "use_qalora": False,
            "brand_new_option": 1}
    with pytest.warns(UserWarning, match="ignoring unknown keys brand_new_option"):
        cfg = lk.LoraConfig.from_peft_dict(data, source="x/adapter_config.json")
    assert cfg.r == 4


def test_from_peft_dict_refuses_features_it_cannot_compute():
    data = {"peft_type": "LORA", "r": 4, "layer_replication": [[0, 2]]}
    with pytest.raises(lk.ConfigError, match="layer_replication=.* is a PEFT feature lorakit does not implement"):
        lk.LoraConfig.from_peft_dict(data)


def test_from_peft_dict_names_the_file_on_bad_values():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(lk.ConfigError, match=r"^a/adapter_config.json: LoraConfig.r must be"):
            lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "r": -1}, source="a/adapter_config.json")
