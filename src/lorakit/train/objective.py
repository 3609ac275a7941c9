"""What a training step minimises, and the micro-batches it is computed on.

The training step (lorakit.train.loop.train_step) asks its objective for three things:

    batches(stream, dist)   this process's micro-batches of the next optimizer step, built from
                            the rows it takes off the row stream (the checkpointed data order)
    count(batch)            how many terms the loss of `batch` sums (SFT: trained tokens)
    loss(model, batch)      that sum, from one forward of `model` (the module the step calls)

and divides each micro-batch's sum by the count of the whole step, over all its micro-batches and
all processes, so every term weighs the same however the batch is split. That is why the count is
its own method: the first micro-batch's backward already needs the total, before the other
micro-batches' forwards.

`SFT` (supervised fine-tuning) is the objective there is. Another objective (preference training:
DPO, KTO, ...) is another implementation of these three methods, with its own rows and batches.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from .data import Example, PackedRow, RowStream, collate
from .distributed import Dist
from .loss import loss_sum, trained_tokens

Batch = dict[str, Tensor]


class Objective(Protocol):
    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]: ...

    def count(self, batch: Batch) -> Tensor: ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...


class SFT:
    """Next-token cross-entropy summed over the trained tokens (lorakit.train.loss).

    Each global micro-batch is the `micro_batch_size` x processes next rows of the stream, the
    micro-batch one process with that many rows would take; each process collates its own slice.
    """

    def __init__(self, rows: list[Example] | list[PackedRow], pad_id: int, micro_batch_size: int, grad_accum: int,
                 chunked: bool, kernel: bool) -> None:
        self.rows, self.pad_id = rows, pad_id
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.chunked, self.kernel = chunked, kernel

    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]:
        out = []
        for _ in range(self.grad_accum):
            ids = stream.take(self.micro_batch_size * dist.world)
            mine = ids[dist.rank * self.micro_batch_size:(dist.rank + 1) * self.micro_batch_size]
            out.append(collate([self.rows[i] for i in mine], self.pad_id))
        return out

    def count(self, batch: Batch) -> Tensor:
        return trained_tokens(batch["labels"])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return loss_sum(model, batch, chunked=self.chunked, kernel=self.kernel)[0]
