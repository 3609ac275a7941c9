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
    seq_at_position_limit: bool = False
    """`largest_seq` is the model's max_position_embeddings: the model bounds it, not the memory."""


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
    strategy: str = "single"
    """training.strategy: single, ddp or fsdp."""
    processes: int = 1
    """Processes the run is planned for (--nproc); the memory figures are per process."""
    max_position_embeddings: int | None = None
    """The model's position limit (None: it has none in its config)."""
