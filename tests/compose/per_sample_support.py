"""What the per-sample tests share (test_per_sample.py, test_stacked_adapters.py): the tiny Llama with
three adapters of different shapes, a row run alone with its adapter as the reference, seeded ids."""

from __future__ import annotations

import torch
from adapter_support import randomise
from tiny_models import tiny_llama

import lorakit as lk

ATOL = 1e-5
BASE = "__base__"


def llama_with_adapters() -> torch.nn.Module:
    """a: r=4 all-linear; b: r=8 with rank/alpha patterns; c: rsLoRA on q/v and the embeddings
    (so c is missing from most layers and the embedding composer runs)."""
    model = tiny_llama()
    configs = {
        "a": lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "b": lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"q_proj": 2, "down_proj": 6},
                           alpha_pattern={"v_proj": 3}),
        "c": lk.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    }
    for seed, (name, cfg) in enumerate(configs.items()):
        lk.add_adapter(model, cfg, name=name)
        randomise(model, name, seed, scale=0.2)
    return model


def run_alone(model: torch.nn.Module, name: str, fn):
    """fn() with only `name` active, or on the exact base for "__base__"."""
    if name == BASE:
        with lk.disable_adapters(model):
            return fn()
    lk.set_active_adapters(model, [name])
    return fn()


def random_ids(rows: int, width: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (rows, width), generator=torch.Generator().manual_seed(seed))
