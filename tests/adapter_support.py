"""Helpers for tests that need an adapter which changes the output (test_inject.py, test_io.py)."""

from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Give adapter `name` non-zero B (and A for embeddings) so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname or f"lora_embedding_A.{name}" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * std)
