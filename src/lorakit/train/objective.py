"""What a training step minimises, and the micro-batches it is computed on.

The training step (lorakit.train.loop.train_step) asks its objective for:

    batches(stream, dist)   this process's micro-batches of the next optimizer step, built from
                            the rows it takes off the row stream (the checkpointed data order)
    count(batch)            how many terms each part of the loss of `batch` sums: a scalar (SFT:
                            trained tokens) or (K,) for a loss of K parts with their own
                            normalisers (ORPO: pairs for the odds ratio, chosen tokens for the NLL)
    loss(model, batch)      those sums, from the forward(s) of `model` (the module the step calls)
    take_metrics()          {column: (sum, count)} this process gathered since the last call
                            (rewards, KL, ...): the loop sums both over processes and logs sum / count
    evaluate(model)         {column: value} on the held-out data, next to the SFT evaluation
    held_out                how many held-out examples `evaluate` scores (0 for SFT, whose held-out
                            data is the SFT evaluation's)

and divides each micro-batch's sums by the counts of the whole step, over all its micro-batches
and all processes, so every term weighs the same however the batch is split. That is why the count
is its own method: the first micro-batch's backward already needs the total, before the other
micro-batches' forwards. `columns` and `eval_columns` name the metrics columns the objective adds,
`progress` those of them the progress bar shows.

`SFT` (supervised fine-tuning) is here; the preference objectives (lorakit.train.preference) and
GRPO (lorakit.train.grpo) are the others, each with its own rows and batches.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .data import Example, PackedRow, RowStream, collate
from .distributed import Dist
from .loss import loss_sum, trained_tokens

Batch = dict[str, Tensor]


Metrics = dict[str, tuple[Tensor, Tensor]]


class Objective(Protocol):
    columns: tuple[str, ...]
    eval_columns: tuple[str, ...]
    progress: tuple[str, ...]
    held_out: int

    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]: ...

    def count(self, batch: Batch) -> Tensor: ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def take_metrics(self) -> Metrics: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


class SFT:
    """Next-token cross-entropy summed over the trained tokens (lorakit.train.loss).

    Each global micro-batch is the `micro_batch_size` x processes next rows of the stream, the
    micro-batch one process with that many rows would take; each process collates its own slice.
    """
    columns: tuple[str, ...] = ()
    eval_columns: tuple[str, ...] = ()
    progress: tuple[str, ...] = ()
    held_out = 0

    def __init__(self, rows: list[Example] | list[PackedRow], pad_id: int, micro_batch_size: int, grad_accum: int,
                 chunked: bool, kernel: bool) -> None:
        self.rows, self.pad_id = rows, pad_id
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.chunked, self.kernel = chunked, kernel

    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]:
        out = []
        for _ in range(self.grad_accum):
            ids = stream.take(self.micro_batch_size * dist.world)
            mine = my_slice(ids, self.micro_batch_size, dist)
            out.append(collate([self.rows[i] for i in mine], self.pad_id))
        return out

    def count(self, batch: Batch) -> Tensor:
        return trained_tokens(batch["labels"])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return loss_sum(model, batch, chunked=self.chunked, kernel=self.kernel)[0]

    def take_metrics(self) -> Metrics:
        return {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


def my_slice(ids: list[int], micro_batch_size: int, dist: Dist) -> list[int]:
    """This process's rows of a global micro-batch of `micro_batch_size` x processes rows."""
    return ids[dist.rank * micro_batch_size:(dist.rank + 1) * micro_batch_size]


class MetricSums:
    """Per-process sums of logged statistics and their counts, taken by the loop after each step."""

    def __init__(self) -> None:
        self.sums: Metrics = {}

    def add(self, name: str, values: Tensor) -> None:
        """Add the (detached) `values` of one micro-batch: their sum and how many they are."""
        values = values.detach().float()
        self.add_total(name, values.sum(), torch.tensor(float(values.numel()), device=values.device))

    def add_total(self, name: str, total: Tensor, count: Tensor) -> None:
        """Add a sum and the count it is over (a mean per token, say, where values are per row)."""
        old_total, old_n = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (old_total + total.detach().float(), old_n + count.detach().float())

    def take(self) -> Metrics:
        out, self.sums = self.sums, {}
        return out
