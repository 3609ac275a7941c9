"""Progress of long work (training steps, building the built-in model): tqdm's bar on a terminal,
plain lines in a log. A bar redraws itself with carriage returns, which a terminal overwrites but
a log file keeps: a few hundred steps would leave thousands of partial lines in it. So when the
output is not a terminal, one line is written every `interval` seconds, and one at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm
from transformers.utils import logging as hf_logging


class LogLines:
    """The part of tqdm's interface the callers use (update, set_postfix, close), as plain lines:
    `desc: step n/total (p%), loss=..., 0:31 elapsed, 2:04 left`."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: IO[str] | None = None, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.n, self.initial = total, desc, initial, initial
        self.file, self.interval, self.clock = file or sys.stderr, interval, clock
        self.start = self.last = clock()
        self.postfix: dict[str, Any] = {}
        self.written_at: int | None = None

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._write()

    def close(self) -> None:
        if self.written_at != self.n and self.n > self.initial:
            self._write()

    def _write(self) -> None:
        now = self.clock()
        elapsed, done = now - self.start, self.n - self.initial
        left = elapsed / done * (self.total - self.n) if done else None
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed"
                     + (f", {tqdm.format_interval(left)} left" if left is not None else ""))
        self.file.write(", ".join(parts) + "\n")
        self.file.flush()
        self.last, self.written_at = now, self.n


def quiet_library_bars() -> None:
    """When stderr is not a terminal, turn off transformers' own bars ("Loading weights", "Writing
    model shards"), which would leave their redraws in the log as lorakit's bar would."""
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True, file: IO[str] | None = None,
             interval: float = 30.0) -> tqdm | LogLines:
    """A progress display for `total` steps on `file` (stderr): tqdm's bar on a terminal, else
    `LogLines` every `interval` seconds; nothing at all when not `enabled` (other processes)."""
    file = file or sys.stderr
    if enabled and not (hasattr(file, "isatty") and file.isatty()):
        return LogLines(total, desc, initial, file, interval)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=0.5,
                file=file)
