"""The reference model of the preference and RL objectives, at no memory cost.

A LoRA run's reference is the base model it started from, and that model is already in memory:
it is the trained model with its adapter switched off (`inject.disable_adapters`). Or, with
`training.reference_adapter`, a second, frozen adapter on the same base (e.g. the SFT run that
DPO starts from), made the only active one for the reference forward. Either way no second copy
of the model exists, where TRL users without PEFT hold two.

The reference forward runs in eval mode (no dropout: a reference is a fixed function of its
input) and without gradients, on the model itself rather than its DDP wrapper (no gradient to
reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import inject

REFERENCE_ADAPTER = "reference"
"""The name the reference adapter is loaded under, next to the trained `default`."""


@contextlib.contextmanager
def as_reference(model: nn.Module, adapter: str | None) -> Iterator[nn.Module]:
    """Within the block `model` computes the reference: the base (`adapter` None) or only `adapter`
    active; eval mode, no gradients. Everything is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if adapter is None:
                with inject.disable_adapters(model):
                    yield model
            else:
                active = inject.active_adapters(model)
                inject.set_active_adapters(model, adapter)
                try:
                    yield model
                finally:
                    inject.set_active_adapters(model, active)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[nn.Module]:
    """The trained policy scored without gradients, in eval mode (for estimates that take no
    gradient, such as KTO's KL term, and for evaluation)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
