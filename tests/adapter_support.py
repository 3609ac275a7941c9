"""Helpers for tests that need adapters which change the output (inject, io, compose)."""

from __future__ import annotations

import torch

from lorakit.inject import lora_layers


def perturb(model: torch.nn.Module, name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Give adapter `name` non-zero B (and A for embeddings) so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname or f"lora_embedding_A.{name}" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def randomise(model: torch.nn.Module, name: str, seed: int, scale: float = 0.3) -> None:
    """Random factors (and lora_bias) so that every adapter changes the output (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.r:
                for p in layer.adapter_parameters(name).values():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
