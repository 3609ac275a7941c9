"""`ServeConfig`: the server's limits, one typed dataclass validated once, at construction.

`lorakit serve` builds its `--max-batch-size`, `--max-queue`, ... flags from these fields (names
with dashes, help from the docstrings), so the flags, the defaults and the docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = 32
    """Most requests decoded together in one forward pass; more wait in the queue."""
    max_queue: int = 256
    """Most requests waiting for a batch slot; beyond it a request gets 429 (server busy)."""
    max_tokens: int = 1024
    """Most new tokens one request may ask for (max_tokens above it is a 400)."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens (a longer one is a 400 that gives both numbers)."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens prefilled in one step when requests join; bounds the pause the running rows see."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted (413 above it)."""
    body_timeout_s: float = 30.0
    """Most seconds a client may take to send its request body; past it the request gets 408 (a body sent a byte at a time holds no connection for long)."""
    request_timeout_s: float = 300.0
    """Wall-clock limit of one request, queueing included; past it the request is cancelled (408), and a stream the client stopped reading is closed."""
    shutdown_timeout_s: float = 30.0
    """On shutdown, how long in-flight requests may run to completion before they are cancelled."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"serve config {f.name} must be an integer >= 1, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"serve config {f.name} must be a number > 0 (seconds), got {value!r}")
        if self.max_prefill_tokens < self.max_prompt_tokens:
            raise ConfigError(f"serve config max_prefill_tokens ({self.max_prefill_tokens}) must be at least "
                              f"max_prompt_tokens ({self.max_prompt_tokens}), or the longest prompt could never join")
