"""Files written so that nothing is half-written, and read so that a bad file is a clear error.

Every file and directory lorakit writes (adapters, mixtures, routers, checkpoints, merged models,
the built-in model and dataset) is first written under a hidden temporary name next to its
target (`.<name>.<random>`), then renamed into place: a reader sees the old version or the new
one, never a torn one, and a crash leaves at most a hidden temporary behind. Tensors are read
from safetensors only (never unpickled), and a truncated or corrupt file says so by name; text
files are UTF-8, and one that is not says where.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

if TYPE_CHECKING:
    from torch import Tensor

from .errors import AdapterFileError, LoraError


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


def remove_temporaries(parent: Path, target: str) -> list[Path]:
    """Remove the temporaries `atomic_write` and `atomic_dir` left in `parent` for the targets whose
    name matches the glob `target` (a process killed mid-write leaves them) and return them. Only
    safe while no other process writes those targets."""
    found = sorted(parent.glob(f".{target}.*")) if parent.is_dir() else []
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def read_safetensors(file: Path, holds: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file. A missing file is a `FileNotFoundError` saying what its
    directory should hold (`holds`, e.g. "an adapter directory holds ..."); an unreadable one an
    `AdapterFileError`."""
    from safetensors.torch import load_file  # imports torch: not at the top, which the CLI's --help imports

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {holds}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read as safetensors: {e}") from None


def read_text(file: str | os.PathLike, error: type[LoraError] = LoraError) -> str:
    """The text of a UTF-8 file (config, data, messages), a leading byte-order mark dropped as
    editors on Windows write one. Bytes that are not UTF-8 raise `error` naming the file, line and
    byte offset of the first bad byte: Python's UnicodeDecodeError names none of them, and when
    it comes from a file read in chunks its offset counts from the chunk, not the file."""
    raw = Path(file).read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{file}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                    "the file must be UTF-8 text") from None
