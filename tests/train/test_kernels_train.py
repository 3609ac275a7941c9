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


def assert_same_adapters(a_dir, b_dir):
    a = load_file(Path(a_dir) / "adapter_model.safetensors")
    b = load_file(Path(b_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:   # Adam divides by the gradient's scale, so float rounding shows at ~1e-6
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


def test_training_with_the_kernels_equals_pytorch(base_overrides, tmp_path, capsys):
    rope = modeling_llama.apply_rotary_pos_emb
    common = base_overrides + ["training.max_steps=3", "data.eval=null"]
    torch_run = run(common + ["training.kernels=torch", f"output.dir={tmp_path / 'torch'}"])
    assert "Triton kernels" not in capsys.readouterr().out
    kernel_run = run(common + ["training.kernels=triton", f"output.dir={tmp_path / 'triton'}"])
    assert ("Triton kernels: 5 RMSNorm, 2 SwiGLU MLP, 2 RoPE attention modules, dropout in 14 adapted layers, "
            "the chunked loss") in capsys.readouterr().out
    assert modeling_llama.apply_rotary_pos_emb is rope          # undone when the run ended
    assert kernel_run.losses == pytest.approx(torch_run.losses, rel=1e-5)
    assert_same_adapters(tmp_path / "torch", tmp_path / "triton")


@pytest.mark.slow   # ~30 s in Triton's interpreter; the fast suite has the same check on the model, without the
# loop (tests/kernels/test_kernels_model.py::test_dropout_masks_follow_the_seed_and_checkpointing_draws_them_again)
def test_dropout_masks_of_the_kernels_are_redrawn_by_checkpointing(base_overrides, tmp_path):
    """The kernels draw their own dropout masks (another stream than PyTorch's), so the check is
    against the kernels without checkpointing: recomputing a layer draws the same masks again."""
    common = base_overrides + ["training.max_steps=2", "data.eval=null", "lora.lora_dropout=0.1",
                               "training.kernels=triton"]
    plain = run(common + [f"output.dir={tmp_path / 'plain'}"])
    ckpt = run(common + ["training.gradient_checkpointing=true", f"output.dir={tmp_path / 'ckpt'}"])
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert_same_adapters(tmp_path / "plain", tmp_path / "ckpt")


def test_kernels_setting_is_checked(base_overrides):
    with pytest.raises(ConfigError, match="^override 'training.kernels=cuda': training.kernels must be one of "
                                          "auto, triton, torch, got 'cuda'$"):
        load_config(None, base_overrides + ["training.kernels=cuda"])
    with pytest.raises(ConfigError, match="^override 'training.compile=true': training.kernels: triton and "
                                          "training.compile: true exclude each other"):
        load_config(None, base_overrides + ["training.kernels=triton", "training.compile=true"])
    assert load_config(None, base_overrides + ["training.compile=true"]).training.kernels == "auto"
