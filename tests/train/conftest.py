"""Fixtures for training tests: a tiny model directory with the built-in byte tokenizer, and a
small learnable chat dataset, both written to disk so the real loading paths run."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_model_dir

from lorakit.builtin import build_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model_dir(path, build_tokenizer(), positions=256)   # the 2-layer width-32 Llama, seed 0
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """Chat records of different lengths (so per-token normalisation matters): 'echo WORD' -> WORD."""
    path = tmp_path_factory.mktemp("data")
    words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white", "orange", "violet",
             "indigo", "teal", "olive", "maroon", "navy", "silver"]

    def write(name, items):
        with open(path / name, "w") as f:
            for w in items:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"echo {w}"},
                                                 {"role": "assistant", "content": w}]}) + "\n")

    write("train.jsonl", words[:12])
    write("eval.jsonl", words[12:])
    return path / "train.jsonl", path / "eval.jsonl"


@pytest.fixture
def base_overrides(model_dir, data_files, tmp_path):
    train, evaluation = data_files
    return [f"model.name_or_path={model_dir}", f"data.train={train}", f"data.eval={evaluation}",
            "data.max_seq_len=64", "training.micro_batch_size=4", "training.lr=1e-2", "training.max_steps=6",
            "training.schedule=constant", "lora.r=4", "lora.lora_alpha=8", "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}"]
