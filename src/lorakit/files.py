"""Files written so that nothing is half-written, and read so that a bad file is a clear error.

Every file and directory lorakit writes (adapters, mixtures, routers, checkpoints, merged models,
the built-in model and dataset) is first written under a hidden temporary name next to its
target (`.<name>.<random>`), then renamed into place: a reader sees the old version or the new
one, never a torn one, and a crash leaves at most a hidden temporary behind. Tensors are read
from safetensors only (never unpickled), and a truncated or corrupt file says so by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .errors import AdapterFileError


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the whole file to a temporary path, which then replaces `target`."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False,
               built_by_another: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; when the block ends without an error it
    is renamed to `target` (an existing empty `target` is replaced; a non-empty one only with
    `overwrite`). `built_by_another()` says whether a concurrent process already put a complete
    `target` in place, in which case losing the rename race is fine. The temporary directory is
    removed whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if overwrite and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if built_by_another is None or not built_by_another():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_safetensors(file: Path, holds: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file. A missing file is a `FileNotFoundError` saying what its
    directory should hold (`holds`, e.g. "an adapter directory holds ..."); an unreadable one an
    `AdapterFileError`."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {holds}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read as safetensors: {e}") from None
