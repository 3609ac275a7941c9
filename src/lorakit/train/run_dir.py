"""The run directory's guard: one run at a time writes an `output.dir`, and what a killed run left
half-written there is cleared before the next one starts.

`output.dir/train.lock` names the run holding the directory (pid, host). The lock itself is the
kernel's `flock` on that file, not the file's existence: a run that dies, SIGKILL included, loses
it at once, so a lock left by a dead run is stale by construction and the next run takes it over,
with no pid check to fool (a restarted container reuses pids and host names). Taking the lock is
also the writability check: it creates a file in `output.dir`, before any model is loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import LoraError
from ..files import remove_temporaries

LOCK_NAME = "train.lock"


class OutputDirBusy(LoraError):
    """Another run holds the output directory's lock."""


class RunLock:
    """The exclusive lock of one run directory, held from `acquire` to `release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Create `out` if needed and lock it, or raise: `OutputDirBusy` naming the holder's pid
        and host, or a `LoraError` when `out` cannot be written."""
        path = out / LOCK_NAME
        try:
            out.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise OutputDirBusy(f"output.dir {out} is in use by another run ({_holder(path)}); wait for it "
                                        "to end, stop it, or choose another output.dir") from None
                try:   # a releasing run unlinks the file before unlocking it: a lock on that file holds nothing
                    if os.path.samestat(os.fstat(fd), os.stat(path)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        except OSError as e:
            raise LoraError(f"output.dir {out} cannot be written ({e.strerror or e}); "
                            "choose a writable directory for output.dir") from None
        return cls(path, fd)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def _holder(path: Path) -> str:
    """'pid N on host H' from the lock file, as its holder wrote it."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):   # the holder is between locking and writing its name
        return "a process that is just starting"


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the hidden temporaries a killed run left (half-written checkpoints, a metrics file
    being rewritten, the trackers' run ids); only the lock holder may, as a live run's temporaries
    look the same."""
    return (remove_temporaries(out / "checkpoints", "step-*") + remove_temporaries(out, "metrics.csv")
            + remove_temporaries(out, "trackers.json"))
