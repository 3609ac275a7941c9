"""`model.save_pretrained` of a model with lorakit adapters writes the adapters in PEFT's format
(lorakit.hf_saving), as `PeftModel.save_pretrained` does, so HF Trainer and TRL SFTTrainer
checkpoints are adapters that `lk.load_adapter` and `peft.PeftModel.from_pretrained` load with the
trained model's logits. Before, it wrote `...base_layer.weight` / `...lora_A.default.weight` keys
that `from_pretrained` initialised at random."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import peft
import pytest
import torch
from adapter_support import randomise
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel, Trainer, TrainingArguments

import lorakit as lk
from lorakit.builtin import build_tokenizer

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapted(seed: int = 3, **config):
    model = tiny_model()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config))
    randomise(model, "default", seed=seed)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_loads_as(directory: Path, expected: torch.Tensor, ids, base=tiny_model) -> None:
    """`directory` loads into a fresh base with lorakit and with PEFT, both giving `expected`."""
    torch.testing.assert_close(logits(lk.load_adapter(base(), directory), ids), expected, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(base(), directory)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)


def test_save_pretrained_writes_the_adapter_in_peft_format(tmp_path, ids):
    model = adapted()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ADAPTER_FILES
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert set(f.keys()) == set(lk.adapter_state_dict(model))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_loads_as(tmp_path, logits(model, ids), ids)


def test_several_adapters_are_laid_out_as_save_adapter_does(tmp_path, ids):
    model = adapted()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["k_proj"]), name="other")
    randomise(model, "other", seed=5)
    model.save_pretrained(tmp_path / "all")
    lk.save_adapter(model, tmp_path / "reference")
    for sub in ("", "other"):
        assert sorted(p.name for p in (tmp_path / "all" / sub).iterdir() if p.is_file()) == ADAPTER_FILES
        assert (tmp_path / "all" / sub / "adapter_config.json").read_text() == \
            (tmp_path / "reference" / sub / "adapter_config.json").read_text()
    model.save_pretrained(tmp_path / "one", selected_adapters="other")
    assert sorted(os.listdir(tmp_path / "one")) == ADAPTER_FILES   # the only one: at the root
    expected = logits(model, ids)   # "other" is active
    torch.testing.assert_close(logits(lk.load_adapter(tiny_model(), tmp_path / "one"), ids), expected)
    with pytest.raises(lk.AdapterStateError, match=r"^no adapter named 'nope'; adapters on this model: "
                                                   r"\['default', 'other'\]$"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["other", "nope"])
    assert not (tmp_path / "bad").exists()


def test_the_adapters_are_read_from_a_given_state_dict(tmp_path, ids):
    """Trainer passes the gathered state dict under DeepSpeed / FSDP, where the live parameters are
    shards: the file holds its tensors, not the model's."""
    model = adapted()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    state[key] += 1.0
    model.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], state[key])
    del state[key]
    with pytest.raises(lk.LoraError, match="^" + re.escape(
            f"the state_dict given to save_pretrained has no {key} (adapter 'default'); pass the model's full state "
            "dict, or none to read the adapter from the model") + "$"):
        model.save_pretrained(tmp_path / "bad", state_dict=state)


def test_only_the_main_process_writes_and_full_model_options_are_refused_or_ignored(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    with pytest.raises(lk.LoraError, match=r"^save_pretrained\(push_to_hub=True\): lorakit writes the adapter "
                                           r"directory only; save it here and upload the folder with "
                                           r"huggingface_hub.upload_folder$"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(lk.LoraError, match=r"^save_pretrained\(safe_serialization=False\): lorakit writes "
                                           r"adapters as safetensors only \(it never pickles\); leave "
                                           r"safe_serialization at True$"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    model.save_pretrained(tmp_path / "shards", max_shard_size="1MB", variant="x")   # no say over an adapter
    with pytest.warns(UserWarning, match=r"^save_pretrained of a model with lorakit adapters ignores \['frobnicate'\]"):
        model.save_pretrained(tmp_path / "unknown", frobnicate=1)
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(os.listdir(tmp_path / "unknown")) == ADAPTER_FILES


def test_it_is_an_instance_attribute_that_unload_removes(tmp_path, ids):
    model, other = adapted(), tiny_model()
    assert "save_pretrained" in vars(model) and "save_pretrained" not in vars(other)
    assert LlamaForCausalLM.save_pretrained is PreTrainedModel.save_pretrained   # the class is untouched
    twin = copy.deepcopy(model)   # the method follows the copy
    twin.save_pretrained(tmp_path / "twin")
    assert sorted(os.listdir(tmp_path / "twin")) == ADAPTER_FILES

    merged = lk.unload(model, merge=True)
    assert "save_pretrained" not in vars(merged)
    merged.save_pretrained(tmp_path / "merged")   # a plain model saves in full again
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "merged"))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids),
                               logits(merged, ids), rtol=1e-5, atol=1e-5)

    lk.delete_adapter(twin, "default")   # the last adapter gone: plain too
    assert "save_pretrained" not in vars(twin)


def test_a_save_pretrained_someone_else_set_is_left_alone():
    model = tiny_model()

    def theirs(*args, **kwargs):
        return "theirs"

    model.save_pretrained = theirs
    with pytest.warns(UserWarning, match=r"^LlamaForCausalLM.save_pretrained is already replaced on this instance; "
                                         r"lorakit leaves it, so it may not write the adapters: save them with "
                                         r"lorakit.save_adapter$"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]))
    assert model.save_pretrained is theirs
    lk.unload(model)
    assert model.save_pretrained is theirs


# ---- Trainer and TRL ---------------------------------------------------------------------------


def _token_model():
    return tiny_model(tokenizer=build_tokenizer())


def _check_checkpoints(out: Path, model, steps: list[int], ids) -> None:
    """Each checkpoint is an adapter directory; the last one gives the trained model's logits."""
    for step in steps:
        ckpt = out / f"checkpoint-{step}"
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
        assert not {"model.safetensors", "config.json"} & set(os.listdir(ckpt))
    saved = load_file(out / f"checkpoint-{steps[-1]}" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)   # it trained (B starts at 0)
    assert_loads_as(out / f"checkpoint-{steps[-1]}", logits(model, ids), ids, base=_token_model)


def test_trainer_checkpoints_are_loadable_adapters(tmp_path, ids):
    model = _token_model()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (12,), generator=g) for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    _check_checkpoints(tmp_path, model, [1, 2], ids)
    # Trainer resumes only a full model or a peft.PeftModel (README "Python API"): it says so in its words
    with pytest.raises(ValueError, match="^Can't find a checkpoint index"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_trl_sft_trainer_checkpoints_are_loadable_adapters(tmp_path, ids):
    import trl  # a dev dependency; imported here, as it takes seconds, for this test only
    from datasets import Dataset

    model = _token_model()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    data = Dataset.from_dict({"text": [f"Is {n} even or odd? {'odd' if n % 2 else 'even'}" for n in range(8)]})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, max_length=32,
                         bf16=False)   # SFTConfig's own defaults otherwise, gradient checkpointing included
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=build_tokenizer())
    trainer.train()
    _check_checkpoints(tmp_path, model, [1, 2], ids)
