"""Replacing a module's `forward` for a while: the one way lorakit does it, and how it is undone.

Some features must change what one module instance computes without touching its class or the
user's model structure: `training.compile` gives each decoder layer a compiled forward, the
Triton kernels route norms, MLPs and attention through their kernels, and the chunked loss makes
the output head hand back its input instead of the logits for one call. Each sets `forward` as an
*instance* attribute: `nn.Module.__call__` looks up `self.forward`, so hooks, DDP, FSDP and
activation checkpointing still run around the replacement, while the class and every other
instance keep their own. Deleting the attribute brings the class's forward back.

The rules, so that two features (or a user's or accelerate's own patch) never undo each other:
  - a module whose forward is already replaced on the instance is not replaced again
    (`ForwardPatches.add` refuses; callers check `replaced_forward` first and leave it be);
  - `remove` takes back only replacements that are still in place and still ours: one that
    someone replaced after us, or removed by hand, is left as it is;
  - a replacement that must follow `copy.deepcopy` onto the copy (`modules_to_save` copies a
    module that way) is a method bound to the module (`types.MethodType`), which deepcopy rebinds
    to the copy, not a closure over the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import LoraError


def replaced_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The forward set on this instance (by lorakit or anyone else), or None if it runs its class's."""
    return vars(module).get("forward")


class ForwardPatches:
    """A group of instance-forward replacements, undone together (last first) by `remove` or on
    leaving a `with` block."""

    def __init__(self) -> None:
        self._patched: list[tuple[nn.Module, Callable[..., Any]]] = []

    def add(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """Make `forward` what `module(...)` runs, until `remove`."""
        if replaced_forward(module) is not None:
            raise LoraError(f"{type(module).__name__}.forward is already replaced on this instance; lorakit does "
                            "not replace it twice (remove the other replacement first)")
        module.forward = forward
        self._patched.append((module, forward))

    def __len__(self) -> int:
        return len(self._patched)

    def remove(self) -> None:
        """Give each module its class's forward back, where our replacement is still the one in place."""
        while self._patched:
            module, forward = self._patched.pop()
            if replaced_forward(module) is forward:
                del module.forward

    def __enter__(self) -> ForwardPatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
