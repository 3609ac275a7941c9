"""Package namespaces that import their modules when a name is first used (PEP 562).

`import lorakit.X` runs `lorakit/__init__.py` (and X's package's `__init__.py`) first, so a package
that imported its modules eagerly would make every import of lorakit, the CLI's included, pay for
torch and transformers: seconds before `lorakit --help` or `--version` could answer. A package's
`__init__` instead names each export and the module that defines it; the module is imported when
the name is first read, and the value is then cached on the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for package `package`, whose export `name` lives in module
    `exports[name]` (relative to the package, e.g. ".inject"). Any other attribute that is a
    submodule (`lorakit.inject`) is imported too, as an eager package would have made it available."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        else:
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise   # a submodule that exists but lacks a dependency: say which
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
