"""Error types. Every lorakit error is a `LoraError` (a `ValueError`), so callers can catch one
type; subclasses let tests and tools tell the cases apart. Messages name the thing and the fix."""

from collections.abc import Sequence


class LoraError(ValueError):
    """Base class of lorakit's errors."""


class ConfigError(LoraError):
    """A configuration value is invalid (the message names the field)."""


class TargetModulesError(LoraError):
    """The target modules of an adapter matched nothing, or matched something unsupported."""


class AdapterStateError(LoraError):
    """An adapter name, merge state or active set does not allow the requested operation."""


class AdapterFileError(LoraError):
    """An adapter directory or file is missing pieces, corrupt, or does not fit the model."""


class DataError(LoraError):
    """A data file or record cannot be read or used (the message names the file and line)."""


def few(items: Sequence[str], n: int = 5) -> str:
    """The first `n` of a long list for a message, and how many more there are."""
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")
