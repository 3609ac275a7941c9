"""Which adapter directories the server may load at run time, and under which names.

An adapter loaded through the API (`POST /v1/adapters`) must lie inside the adapters directory
the server was started with (`--adapters-dir`): the client names a path, absolute or relative to
that directory, and the server reads it only if

  - the path has no `..` component, and an absolute path starts with the adapters directory;
  - no component below the adapters directory is a symlink that resolves outside it, and the
    fully resolved directory (`Path.resolve()`) is inside it;
  - the directory holds `adapter_config.json` and `adapter_model.safetensors`, both regular files
    inside the adapters directory once resolved. A pickle (`adapter_model.bin`) is never read.

The checks run on the resolved path, and the adapter is then read from that resolved path, so a
symlink swapped into the path after the check is not followed. Names are short identifiers
(letters, digits, `_`, `-`), never the served base model's name, `auto` or `__base__`.

Adapters given on the command line (`--adapter NAME=DIR`) are trusted as the operator's own and
may live anywhere; the same name rule and the safetensors rule apply to them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..inject import BASE_NAME
from ..io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from .errors import ServeError

log = logging.getLogger("lorakit.serve")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
AUTO = "auto"   # the model name that asks the router


def check_adapter_name(name: object, base_name: str) -> str:
    """`name` if it may name an adapter, else a 400 that says the rule."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ServeError(f"adapter name {name!r} is not valid: use 1 to 64 letters, digits, '_' or '-', starting with "
                         "a letter or digit", 400, param="name", code="invalid_adapter_name")
    if name in (AUTO, BASE_NAME, base_name):
        raise ServeError(f"adapter name {name!r} is reserved ({AUTO!r} asks the router, {base_name!r} is the base "
                         "model); pick another name", 400, param="name", code="invalid_adapter_name")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_adapter_dir(root: Path, path: object, spelled: Path | None = None) -> Path:
    """The resolved adapter directory `path` names inside the adapters directory `root` (itself
    resolved; `spelled` is how the operator wrote it, which an absolute path may start with too),
    after every check of the module doc. 403 for anything leading outside `root`, 404 for a
    missing path, 400 for a malformed one or a directory without safetensors."""
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise ServeError(f"path must be a non-empty string naming an adapter directory inside the adapters directory, "
                         f"got {path!r}", 400, param="path")
    given = Path(path)
    if ".." in given.parts:
        raise ServeError(f"path {path!r} contains '..'; give a path inside the adapters directory", 403, param="path",
                         code="path_outside_adapters_dir")
    if given.is_absolute():
        prefix = next((p for p in (root, spelled) if p is not None and given.is_relative_to(p)), None)
        if prefix is None:
            raise ServeError(f"path {path!r} is outside the adapters directory {root}", 403, param="path",
                             code="path_outside_adapters_dir")
        given = given.relative_to(prefix)
    current = root
    for part in given.parts:   # every component below root: a symlink must stay inside
        current = current / part
        if current.is_symlink() and not _inside(current.resolve(), root):
            raise ServeError(f"path {path!r} goes through a symlink ({current.relative_to(root)}) that leads outside "
                             f"the adapters directory {root}", 403, param="path", code="path_outside_adapters_dir")
    try:
        directory = (root / given).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ServeError(f"adapter path {path!r} does not exist in the adapters directory {root}", 404,
                         param="path", code="adapter_not_found") from None
    except (OSError, RuntimeError) as e:   # symlink loops, permissions
        raise ServeError(f"adapter path {path!r} cannot be resolved: {e.__class__.__name__}", 400,
                         param="path") from None
    if not _inside(directory, root):
        raise ServeError(f"path {path!r} resolves outside the adapters directory {root}", 403, param="path",
                         code="path_outside_adapters_dir")
    check_adapter_files(directory, root)
    return directory


def check_adapter_files(directory: Path, root: Path | None = None) -> None:
    """`directory` holds the two files of a safetensors adapter (inside `root` once resolved, if
    given); a pickle-only adapter is refused, never read."""
    if not directory.is_dir():
        raise ServeError(f"adapter path {directory} is not a directory", 400, param="path")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = directory / name
        if not file.exists():
            if name == WEIGHTS_NAME and (directory / PICKLE_NAME).exists():
                raise ServeError(f"{directory} holds {PICKLE_NAME}, a pickle, which lorakit never loads; convert it to "
                                 f"{WEIGHTS_NAME} (PEFT: save_pretrained(out, safe_serialization=True))", 400,
                                 param="path", code="unsafe_adapter_format")
            raise ServeError(f"{directory} is not an adapter directory: {name} is missing", 400, param="path",
                             code="not_an_adapter")
        real = file.resolve()
        if root is not None and not _inside(real, root):
            raise ServeError(f"{directory / name} is a symlink that leads outside the adapters directory {root}", 403,
                             param="path", code="path_outside_adapters_dir")
        if not real.is_file():
            raise ServeError(f"{directory / name} is not a regular file", 400, param="path", code="not_an_adapter")


def discover_adapters(root: Path, base_name: str, skipped: dict[str, str] | None = None) -> list[tuple[str, Path]]:
    """(name, resolved directory) of every subdirectory of `root` that passes the checks, by
    name; what does not pass is logged with the reason, not loaded (and put in `skipped`,
    {directory name: reason}, when given): one bad directory must not keep the others from
    being served."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        try:
            name = check_adapter_name(entry.name, base_name)
            found.append((name, resolve_adapter_dir(root, entry.name)))
        except ServeError as e:
            log.warning("adapters dir: skipping %s: %s", entry.name, e)
            if skipped is not None:
                skipped[entry.name] = str(e)
    return found
