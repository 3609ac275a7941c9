"""What `lorakit plan` finds: the plan of one run and how each estimate fits the memory budget
(made by `make_plan`, printed by `render`)."""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import Estimate, Workload
from .params import ParamReport
from .suggest import DataSummary, Suggestion


@dataclass
class Fit:
    """How one estimate fits the memory budget."""

    method: str
    checkpointing: bool
    fits: bool
    """At the configured micro batch and sequence length."""
    largest_batch: int
    """The largest micro_batch_size that fits at the configured max_seq_len (0: none)."""
    largest_seq: int
    """The largest max_seq_len that fits at the configured micro_batch_size (0: none)."""


@dataclass
class Plan:
    model: str
    """Where the model config was read from."""
    model_type: str
    layers_exact: bool
    """The activation model knows this architecture's layers (Llama-style or GPT-2)."""
    workload: Workload
    checkpointing: bool
    """The config's training.gradient_checkpointing."""
    params: ParamReport
    estimates: list[Estimate]
    memory_budget: int | None
    usable_memory: int | None
    fits: list[Fit]
    data: DataSummary
    suggestions: list[Suggestion]
    warnings: list[str]
    notes: list[str]
