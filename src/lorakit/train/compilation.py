"""`training.compile`: `torch.compile` the forward of each decoder layer, for the training steps.

Why the decoder layers and not the whole model: they are where the step's time goes, and the
output head stays outside the compiled code, where the chunked loss (`lorakit.train.loss`) swaps
its forward for every call, which a whole-model graph would have to recompile for. Each layer
stays the same module with the same parameters, so checkpoints and saved adapters do not change.
The adapters' own code compiles without graph breaks (`lorakit.ops.lora_linear`); the model's
layer code is compiled as far as it allows (no `fullgraph`).

A layer runs its compiled forward only when gradients are on, and eagerly otherwise:
  - evaluation and generation run without gradients, with shapes that change at every call
    (prompt lengths, one new token against a growing cache) and would recompile each time;
  - while a `TorchDispatchMode` is active, which is how `lorakit.train.memory` counts the CPU
    peak of the first steps: dynamo cannot trace under one, and a function it first meets there
    it never compiles afterwards. So on a CPU the steps that `PeakMemory` watches run eagerly
    (the same math) and the others compiled; on CUDA no step is watched that way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..errors import ConfigError
from ..patching import ForwardPatches
from .distributed import decoder_layers


def compile_decoder_layers(model: nn.Module) -> ForwardPatches:
    """Give every decoder layer of `model` a compiled forward (module docstring), as instance
    forwards (`lorakit.patching`): `remove()` on the result gives the layers their eager forward back."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"training.compile: found no decoder layers (a ModuleList of alike blocks) in "
                          f"{type(model).__name__}; set training.compile=false")
    patches = ForwardPatches()
    try:
        for layer in layers:
            patches.add(layer, _compiled_for_training(layer.forward))
    except BaseException:
        patches.remove()
        raise
    return patches


def _compiled_for_training(eager):
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled() or is_in_torch_dispatch_mode(include_infra_modes=False):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    return forward
