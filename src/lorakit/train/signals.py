"""Stopping a run cleanly on SIGTERM or SIGINT.

Clusters and preemptible machines send SIGTERM some seconds before they kill; a user presses
Ctrl-C (SIGINT). Either one asks the loop to stop: it finishes the optimizer step under way,
writes a checkpoint and raises `TrainingInterrupted` (the CLI exits with 2 and the message says
how to resume). A second signal is not deferred: the previous handler gets it (Python's default
raises KeyboardInterrupt on SIGINT; SIGTERM's default ends the process), so a stuck run can still
be stopped at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from ..errors import LoraError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(LoraError):
    """SIGTERM or SIGINT stopped the run after a step; a checkpoint of that step was written."""


class StopOnSignal:
    """While entered, SIGTERM and SIGINT set `signum` instead of ending the process; leaving
    restores the previous handlers. Signal handlers can only be set from the main thread, so
    elsewhere (a run inside a worker thread) nothing is installed and the signals act as before.
    A signal the process ignores (`nohup`, a background job's SIGINT) stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, signal.Handlers | object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):   # None: set outside Python, unrestorable
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:   # the second one: what it would have done without us, now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write, not print: a handler may interrupt a print (tqdm's) and print is not reentrant
        os.write(2, f"\nlorakit train: got {signal.Signals(signum).name}; finishing this step and writing a "
                    "checkpoint (send it again to stop at once)\n".encode())
