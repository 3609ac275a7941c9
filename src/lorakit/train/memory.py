"""Peak training memory: the most bytes that torch tensors held at once during training steps.

Why not the process's maximum RSS: it includes the Python interpreter, torch's libraries and the
allocator's caches, none of which a run's plan (`lorakit plan`) can predict or a user can change.
The tensors are: weights, adapter weights, gradients, optimizer state, activations, the loss.

On CUDA the caching allocator keeps the count (`torch.cuda.max_memory_allocated`, reset when a
tracked region starts). On CPU torch keeps none, so a `TorchDispatchMode` watches every op in the
region: each tensor an op makes or reads is registered once by its storage (views share it) with
a weak reference whose callback subtracts the storage's bytes when it is freed. Tensors that exist
before the region count from its start when a holder of them (a module, an optimizer) is named,
and otherwise from the first op that reads them. Scratch buffers an op allocates and frees inside
its own kernel are not seen; on a Llama training step the count agreed with the allocator peak
that `torch.profiler` records to within 0.1%. Storages resized in place (FSDP2 frees gathered
parameters that way) keep their first size in the CPU count.

Watching costs 10-20 us of Python per op, so `PeakMemory.step` watches only the steps that can
set a new peak: the first two (the second starts with the optimizer state the first created) and
then any step whose largest micro-batch is bigger than every batch watched so far (activation
memory grows with the batch; a step no bigger than one already watched repeats its allocations).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Holder = nn.Module | torch.optim.Optimizer | torch.Tensor


class PeakMemory:
    """The peak of the bytes held by torch tensors over the regions it tracked (`peak_bytes`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        """The highest count seen in any tracked region so far (0 before the first)."""
        self._largest = -1
        self._watched = 0

    def step(self, size: int, *holders: Holder) -> contextlib.AbstractContextManager[None]:
        """Track this training step's forward and backward (where a LoRA step peaks) if it can set a
        new peak (see the module docstring). `size`:
        the element count of the step's largest micro-batch of input ids; `holders`: what holds the
        tensors alive across steps (the model, the optimizer)."""
        if self.device.type == "cuda" or self._watched < 2 or size > self._largest:
            self._largest = max(self._largest, size)
            self._watched += 1
            return self.region(*holders)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def region(self, *holders: Holder) -> Iterator[None]:
        """Track every allocation inside the block; tensors of `holders` count from its start."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        watch = _Watch()
        for tensor in _held_tensors(holders):
            watch.add(tensor)
        try:
            with watch:
                yield
        finally:
            self.peak_bytes = max(self.peak_bytes, watch.peak)
            watch.close()


def _held_tensors(holders: tuple[Holder, ...]) -> Iterator[torch.Tensor]:
    for holder in holders:
        if isinstance(holder, torch.Tensor):
            yield holder
        elif isinstance(holder, nn.Module):
            for p in holder.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from holder.buffers()
        else:
            for state in holder.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class _Watch(TorchDispatchMode):
    """Live CPU storages and their bytes, kept up to date by the ops that run under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes: dict[int, int] = {}              # id(storage) -> nbytes, while it lives
        self._refs: dict[int, weakref.ref] = {}       # keeps each storage's free callback alive
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        if isinstance(tensor, DTensor):   # an FSDP2 shard: count the local piece
            tensor = tensor.to_local()
        if tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        key = id(storage)   # stable: a storage keeps its Python object for as long as it lives
        if key in self._bytes:
            return
        size = storage.nbytes()
        self._bytes[key] = size
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._bytes.pop(key)
        del self._refs[key]

    def close(self) -> None:
        """Stop counting: dropping the weak references drops their callbacks."""
        self._refs.clear()
        self._bytes.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self.add(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out
