"""Loading the base model and tokenizer for training: local directories through the same
`from_pretrained` path a hub id takes, dtype and attention choices, clear errors."""

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.model_io import load_model, load_tokenizer, resolve_device, resolve_dtype
from lorakit.train.config import load_config
from lorakit.train.loop import train


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16), ("auto", torch.float32)])
def test_local_directory_loads_in_the_asked_dtype(model_dir, dtype, expected):
    model = load_model(str(model_dir), dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert not model.training and model.device.type == "cpu"


def test_attention_implementation_is_passed_through(model_dir):
    assert load_model(str(model_dir), device="cpu").config._attn_implementation == "sdpa"
    assert load_model(str(model_dir), device="cpu", attn_implementation="eager").config._attn_implementation == "eager"


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^cannot load model '.*nowhere': it is not a local model directory"):
        load_model(str(tmp_path / "nowhere"), device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="^model.device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu0")


def test_tokenizer_without_pad_token_pads_with_eos(model_dir, tmp_path):
    tok = load_tokenizer(str(model_dir))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.pad_token_id == again.eos_token_id is not None


def test_bf16_autocast_trains_with_fp32_adapters(base_overrides, tmp_path):
    """bf16 autocast on CPU: the losses follow the fp32 run to bf16 precision, the adapter stays fp32."""
    fp32 = train(load_config(None, base_overrides + ["training.bf16=false", f"output.dir={tmp_path / 'a'}"]))
    bf16 = train(load_config(None, base_overrides + ["training.bf16=true", f"output.dir={tmp_path / 'b'}"]))
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != fp32.losses      # autocast really ran
    assert {t.dtype for t in load_file(tmp_path / "b" / "adapter_model.safetensors").values()} == {torch.float32}
