"""Adapter inputs rebuilt in backward from tensors that autograd keeps anyway.

A frozen linear layer keeps nothing of its input for backward, but its adapter needs that input x
for the gradient of A, so keeping x is the adapter's whole activation cost. In a decoder layer x is
usually one cheap op away from tensors that other backward nodes keep regardless:

  - q/k/v and gate/up read a norm's output; the norm keeps its own input for its backward, and
    x = norm(input) again, bit for bit (same module, same input, same autocast state);
  - down_proj reads the MLP product act(gate) * up, whose backward keeps both factors; x = a * b;
  - GPT-2's MLP projection reads act(c_fc output), whose backward keeps its input; x = act(input).

(o_proj reads the attention output, which the attention's backward keeps itself: nothing to gain.)
So instead of x the adapter keeps a `Recipe`: a function and tensors that are already saved, whose
storage is therefore counted once; backward calls it to get x back. On a Llama step this takes the
adapters' saved activations from 1.28x the frozen base's to about 1.01x (BENCHMARKS.md).

Recipes are registered by forward hooks that `install` puts on the model, only in a forward that
records a graph (grad enabled) and not while torch.compile traces (dynamo cannot follow the weak
references; the compiled path keeps x):
  - every norm and activation module (nn.LayerNorm, nn.RMSNorm, classes named *RMSNorm /
    *LayerNorm; torch's and transformers' activations) maps its output tensor to
    (module.forward, input), when the input has a graph (so the module's own backward keeps it)
    and is no wider than the output (else keeping it would cost more than keeping x);
  - every activation module and every adapted linear layer also records its output by its
    grad_fn, so that a product of two recorded outputs is recognised from its own grad_fn (a
    MulBackward0 whose two inputs are theirs) without unpacking anything autograd saved.
Entries hold weak references and vanish with their tensors. An output changed in place after its
module made it gets no recipe (its version counter moved), so the adapter keeps it; the recipes'
own inputs go through save_for_backward, whose version check catches later in-place changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class _Rebuilt:
    """One rebuild of x for all the adapters that read it (q, k and v read one norm output, gate
    and up another): x is kept from the first of their backward calls to the last, not rebuilt by
    each. `pending` counts the adapters whose backward will still ask for it; a backward that
    reaches only some of them (autograd.grad on a subset) drops x when it ends."""

    def __init__(self) -> None:
        self.pending = 0
        self.x: Tensor | None = None


@dataclass(frozen=True)
class Recipe:
    """x == fn(*inputs), recomputed with the autocast state of the forward that made x."""

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    autocast: tuple[str, bool, torch.dtype] | None
    shared: _Rebuilt = field(default_factory=_Rebuilt, compare=False, repr=False)

    def rebuild(self) -> Callable[..., Tensor]:
        """x as a function of the recipe's tensors as backward unpacks them, for one adapter whose
        backward will call it once. Holds no tensor until backward (the tensors go through
        save_for_backward, where checkpointing and offloading hooks see them); the adapters that
        share this recipe share one rebuilt x, dropped after the last of them has used it."""
        fn, autocast, shared = self.fn, self.autocast, self.shared
        shared.pending += 1

        def replay(*inputs: Tensor) -> Tensor:
            x = shared.x
            if x is None:
                # released when this backward ends, whichever of the adapters it reached
                torch.autograd.Variable._execution_engine.queue_callback(lambda: setattr(shared, "x", None))
                with torch.no_grad():
                    if autocast is None:
                        x = fn(*inputs)
                    else:
                        device_type, enabled, dtype = autocast
                        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                            x = fn(*inputs)
            shared.pending -= 1
            shared.x = x if shared.pending > 0 else None
            return x
        return replay


class _Registry:
    """Norm outputs by tensor identity, factor outputs by grad_fn identity, both weakly held."""

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[weakref.ref, int, Recipe]] = {}   # id(x) -> (x, its version, recipe)
        self.factors: dict[int, weakref.ref] = {}                  # id(t.grad_fn) -> t

    def add_output(self, out: Tensor, recipe: Recipe) -> None:
        key = id(out)
        self.outputs[key] = (weakref.ref(out, lambda _, k=key: self.outputs.pop(k, None)), out._version, recipe)

    def add_factor(self, out: Tensor) -> None:
        node = out.grad_fn
        if node is None:
            return
        key = id(node)
        self.factors[key] = weakref.ref(out, lambda _, k=key: self.factors.pop(k, None))

    def _factor(self, node) -> Tensor | None:
        ref = self.factors.get(id(node))
        t = ref() if ref is not None else None
        return t if t is not None and t.grad_fn is node else None

    def find(self, x: Tensor) -> Recipe | None:
        entry = self.outputs.get(id(x))
        if entry is not None and entry[0]() is x:
            # changed in place since the module made it: the recipe would rebuild the old values
            return entry[2] if x._version == entry[1] else None
        node = x.grad_fn
        if node is None or node.name() != "MulBackward0" or len(node.next_functions) != 2:
            return None
        a, b = (self._factor(n) for n, _ in node.next_functions)
        if a is None or b is None or a.shape != x.shape or b.shape != x.shape or a.dtype != x.dtype \
                or b.dtype != x.dtype:
            return None
        return Recipe(torch.mul, (a, b), None)   # both saved by the product's own backward


_registry = _Registry()


def _recording() -> bool:
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype] | None:
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return kind, True, torch.get_autocast_dtype(kind)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")


def _output_hook(module: nn.Module, args: tuple, out) -> None:
    """A norm's or an activation's output: rebuilt from its input."""
    if not _recording() or len(args) != 1 or not isinstance(out, Tensor) or not isinstance(args[0], Tensor):
        return
    x_in = args[0]
    if not x_in.requires_grad or x_in.element_size() > out.element_size():
        return
    _registry.add_output(out, Recipe(module.forward, (x_in,), _autocast_state(out.device)))


def _activation_hook(module: nn.Module, args: tuple, out) -> None:
    _output_hook(module, args, out)
    if _recording() and isinstance(out, Tensor):
        _registry.add_factor(out)


def record_output(out: Tensor, recipe: Recipe) -> None:
    """For ops outside modules (lorakit.kernels' SwiGLU product): `out` == recipe, from tensors that
    the op's own backward keeps."""
    if _recording():
        _registry.add_output(out, recipe)


def record_factor(out: Tensor) -> None:
    """Called by adapted linear layers on their output (up_proj's is a factor of the MLP product)."""
    if _recording():
        _registry.add_factor(out)


def find_recipe(x: Tensor) -> Recipe | None:
    """How to rebuild `x` from tensors autograd keeps anyway, or None (then keep x)."""
    return _registry.find(x) if _recording() else None


def install(model: nn.Module) -> list[RemovableHandle]:
    """Put the recording hooks on the model's norms and activations; returns their handles."""
    handles = []
    for module in model.modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(_output_hook))
        elif _is_activation(module):
            handles.append(module.register_forward_hook(_activation_hook))
    return handles
