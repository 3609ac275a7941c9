"""Error types. Every lorakit error is a `LoraError` (a `ValueError`), so callers can catch one
type; subclasses let tests and tools tell the cases apart. Messages name the thing and the fix."""


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
