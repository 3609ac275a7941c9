"""The training objective: cross-entropy summed over trained tokens (labels != -100).

Returning the sum and the token count, not a mean, lets the loop divide by the number of trained
tokens across all accumulated micro-batches (and all processes), so every trained token weighs
the same however the batch is split.

With `chunked=True` (`training.chunked_loss`) the full logits are never made: while the model runs
its own forward, the output head's forward is swapped for one that records the head's input (the
last hidden states) and returns a placeholder of the logits' shape that takes no memory; the loss
then comes from those hidden states and the head's weight by `lorakit.ops.chunked_cross_entropy`,
a chunk of rows at a time. The model's own forward runs, so wrappers (DDP) and hooks see a normal
call, and the result is the plain path's loss and gradients.

The chunked path applies only when that is exact, and otherwise the plain path runs:
  - the head must be a plain `nn.Linear`, or one trained in full through `modules_to_save`; a head
    with a LoRA adapter of its own takes the plain path (its adapter term is not chunked);
  - not under FSDP2, which gathers the head's weight only inside the model's forward;
  - the model must return the head's output as its logits with their values unchanged: the
    placeholder itself (Llama and most models), or a copy of it (OPT's `.contiguous()`, a dtype
    cast), which costs one B x T x V tensor in the forward and a pass over it. This is told by
    behaviour, not by the model's name: the placeholder holds `PROBE`, a value that a copy or a
    cast to fp32, bf16 or fp16 keeps exactly while soft-capping (c tanh(x / c) < x) or scaling
    changes it. A model that changes the logits after the head (Gemma 2's soft-capping, Cohere's
    logit scale) returns other values: that first call is run again on the plain path with the
    random state restored (same dropout masks), a warning says so once, and that model takes the
    plain path from then on.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from ..kernels.common import runs_on
from ..layers import ModulesToSave
from ..ops.chunked_ce import KERNEL_DTYPES, chunked_cross_entropy
from ..patching import ForwardPatches, replaced_forward
from .data import IGNORE_INDEX

PROBE = 1024.0
"""The placeholder logits' value: a power of two, so exact in fp32, bf16 and fp16, and large against
the soft-caps models use (Gemma 2: 30), so c tanh(PROBE / c) differs from it in bf16 too."""

# models seen to change their logits after the output head: the plain path for them from then on
_HEAD_OUTPUT_CHANGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# models seen to return the head's output untouched: no random state to keep for a rerun (on CUDA,
# reading it would synchronise the device at every micro-batch)
_HEAD_OUTPUT_KEPT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def loss_sum(model: nn.Module, batch: dict[str, Tensor], chunked: bool = False,
             kernel: bool = False) -> tuple[Tensor, Tensor]:
    """(sum of next-token cross-entropy over trained positions, number of trained positions).
    `chunked`: compute it without the full logits where that is exact (module docstring);
    `kernel`: with the Triton kernel for each chunk's softmax (lorakit.kernels.cross_entropy)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = trained_tokens(labels)
    hidden, head, logits = head_forward(model, inputs, labels.shape, chunked)
    if hidden is not None:
        return _chunked_loss(hidden, head, labels, kernel), n
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def head_forward(model: nn.Module, inputs: dict[str, Tensor], shape: torch.Size,
                 chunked: bool) -> tuple[Tensor | None, nn.Linear | None, Tensor | None]:
    """One forward of `model` on `inputs` ((B, T) = `shape`): (the head's input hidden (B, T, d),
    the head's linear layer, None) when `chunked` and the chunked path is exact for this model
    (module docstring), else (None, None, the logits (B, T, V))."""
    inner = _unwrap(model)
    head = _chunkable_head(inner) if chunked and inner not in _HEAD_OUTPUT_CHANGED else None
    device = inputs["input_ids"].device
    if head is not None:
        rng = None if inner in _HEAD_OUTPUT_KEPT else _rng_state(device)
        capture = _HeadCapture(head, _linear_of(head).out_features)
        with capture:
            logits = model(**inputs, use_cache=False).logits
        if capture.exact_for(logits, shape):
            del logits
            _HEAD_OUTPUT_KEPT.add(inner)
            return capture.hidden, _linear_of(head), None
        del logits, capture
        _HEAD_OUTPUT_CHANGED.add(inner)
        warnings.warn(f"training.chunked_loss: {type(inner).__name__} changes its logits after the output head "
                      "(e.g. soft-capping or scaling), so the loss is computed from the full logits; set "
                      "training.chunked_loss=false to skip this check", stacklevel=3)
        if rng is not None:                                       # the rerun draws the same dropout masks
            _set_rng_state(rng, device)
    return None, None, model(**inputs, use_cache=False).logits    # (B, T, V)


def trained_tokens(labels: Tensor) -> Tensor:
    """The number of positions `loss_sum` sums over for these (unshifted) labels. The loop needs it
    before the forward: a step divides by the trained tokens of all its micro-batches."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute the head in: autocast's, or the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _chunked_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, kernel: bool) -> Tensor:
    """The loss from the head's input hidden (B, T, d), in the dtype `F.linear` would compute in."""
    dtype = compute_dtype(hidden)
    weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
    # position t predicts label t+1; the last position predicts nothing: no copy of hidden needed
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)    # (B, T)
    kernel = kernel and dtype in KERNEL_DTYPES and runs_on(hidden)
    return chunked_cross_entropy(hidden.to(dtype).flatten(0, 1), weight, targets.flatten(), bias, kernel=kernel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (whose forward the loss still calls)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _chunkable_head(model: nn.Module) -> nn.Module | None:
    """The output head whose input the chunked loss can take, or None for the plain path."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None and not isinstance(model, FSDPModule) else None
    if head is None or not isinstance(_linear_of(head), nn.Linear) or replaced_forward(head) is not None:
        return None
    return head


def _linear_of(head: nn.Module) -> nn.Module:
    """The linear layer that computes the logits: a trained copy under `modules_to_save`."""
    return head.current() if isinstance(head, ModulesToSave) else head


class _HeadCapture:
    """For one model call: the output head records its input and returns a placeholder instead of
    the logits (the scalar `PROBE` expanded to their shape, so no memory)."""

    def __init__(self, head: nn.Module, vocab: int) -> None:
        self.head, self.vocab = head, vocab
        self.calls = 0
        self.hidden: Tensor | None = None
        self.placeholder: Tensor | None = None

    def _forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        self.calls += 1
        self.hidden = hidden                                                  # (B, T, d)
        self.placeholder = hidden.new_full((), PROBE).expand(*hidden.shape[:-1], self.vocab)   # (B, T, V)
        return self.placeholder

    def __enter__(self) -> _HeadCapture:
        self._patch = ForwardPatches()         # lorakit.patching: an instance forward, undone on exit
        self._patch.add(self.head, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        self._patch.remove()

    def exact_for(self, logits: Tensor, labels_shape: torch.Size) -> bool:
        """The model called the head once, on every position, and returned its output with the values
        unchanged: the placeholder itself, or a tensor of its shape holding only `PROBE` (a copy)."""
        if self.calls != 1 or self.hidden.dim() != 3 or self.hidden.shape[:2] != labels_shape:
            return False
        if logits is self.placeholder:
            return True
        if logits.shape != self.placeholder.shape:
            return False
        low, high = torch.aminmax(logits)                  # NaN in either: not equal, so the plain path
        return bool((low == PROBE) & (high == PROBE))


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
