"""`training.kernels`: a `lorakit train` run with the Triton kernels (here in Triton's interpreter on
CPU, tests/conftest.py) trains as the PyTorch path does, and leaves the process as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama import modeling_llama

from lorakit.errors import ConfigError
from lorakit.train.config import load_config
from lorakit.train.loop import train


def run(overrides):
    return train(load_config(None, overrides))


@pytest.mark.parametrize("extra", [[], ["lora.lora_dropout=0.1", "training.gradient_checkpointing=true"]],
                         ids=["plain", "dropout_checkpointing"])
def test_training_with_the_kernels_equals_pytorch(base_overrides, tmp_path, extra, capsys):
    rope = modeling_llama.apply_rotary_pos_emb
    common = base_overrides + extra + ["training.max_steps=3", "data.eval=null"]
    torch_run = run(common + ["training.kernels=torch", f"output.dir={tmp_path / 'torch'}"])
    assert "Triton kernels" not in capsys.readouterr().out
    kernel_run = run(common + ["training.kernels=triton", f"output.dir={tmp_path / 'triton'}"])
    assert "Triton kernels: 5 RMSNorm, 2 SwiGLU MLP, 2 RoPE attention modules, the chunked loss" \
        in capsys.readouterr().out
    assert modeling_llama.apply_rotary_pos_emb is rope          # undone when the run ended
    assert kernel_run.losses == pytest.approx(torch_run.losses, rel=1e-5)
    a = load_file(Path(tmp_path / "torch") / "adapter_model.safetensors")
    b = load_file(Path(tmp_path / "triton") / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:   # Adam divides by the gradient's scale, so float rounding shows at ~1e-6
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


def test_kernels_setting_is_checked(base_overrides):
    with pytest.raises(ConfigError, match="^training.kernels must be one of auto, triton, torch$"):
        load_config(None, base_overrides + ["training.kernels=cuda"])
