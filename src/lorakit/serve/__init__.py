"""Serving many adapters over one base model: `lorakit serve`, an OpenAI-compatible HTTP API.

    config.py     ServeConfig: the limits (batch, queue, tokens, body size, timeouts)
    errors.py     ServeError: an error with its HTTP status and OpenAI error type
    registry.py   adapter names and which directories may be loaded at run time
    sampling.py   per-request token choice (greedy, temperature, top-p, seed) and stop strings
    engine.py     the batching engine: KV cache, continuous batching, per-row adapters
    protocol.py   OpenAI request bodies and response objects
    app.py        the FastAPI app over an engine
    server.py     load model, adapters and router; run under uvicorn

The engine needs only torch and transformers; the HTTP side needs the `serve` extra
(`pip install 'lorakit[serve]'`: FastAPI and uvicorn).
"""

from __future__ import annotations

import importlib.util

from ..errors import LoraError
from ..lazy import lazy_exports

EXTRA = ("fastapi", "uvicorn")


def require_extra() -> None:
    """Raise a LoraError saying what to install when the `serve` extra is missing."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraError(f"lorakit serve needs {' and '.join(missing)}, not installed here: "
                        "pip install 'lorakit[serve]'")


def create_app(*args, **kwargs):
    """`lorakit.serve.app.create_app` (imported on use: it needs the serve extra)."""
    require_extra()
    from .app import create_app as make

    return make(*args, **kwargs)


_EXPORTS = {"Completion": ".engine", "Engine": ".engine", "SamplingParams": ".sampling", "ServeConfig": ".config",
            "ServeError": ".errors"}
__all__ = [*_EXPORTS, "create_app", "require_extra"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
