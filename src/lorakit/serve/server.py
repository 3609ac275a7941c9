"""`lorakit serve`: load the base model, its adapters and the router, and run the app under
uvicorn until SIGINT / SIGTERM.

An adapter given by name (`--adapter NAME=DIR`) that cannot be loaded or served stops the start:
the operator asked for it. A subdirectory of `--adapters-dir` that cannot (its shapes do not fit
the base, it is DoRA, it has no safetensors, ...) is logged with the reason, listed under
"skipped" in `/health`, and the others are served: one bad directory must not take the server
down.

Shutdown is graceful: uvicorn stops accepting connections and waits up to `shutdown_timeout_s`
for the responses in flight; then the engine fails whatever is still running (503) and stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..compose.per_sample import StackedAdapters
from ..compose.router import Router
from ..errors import LoraError
from ..inject import delete_adapter
from ..io import load_adapter
from ..model_io import load_model, load_tokenizer
from .config import ServeConfig
from .engine import Engine
from .registry import check_adapter_files, check_adapter_name, discover_adapters

log = logging.getLogger("lorakit.serve")


@dataclass
class Loaded:
    """What the server serves."""

    engine: Engine
    base_name: str
    adapters_dir: Path | None
    skipped: dict[str, str] = field(default_factory=dict)
    """Subdirectories of the adapters dir not served: {name: reason}."""


def load_server(model: str, adapters: list[str], adapters_dir: str | None = None, router: str | None = None,
                config: ServeConfig | None = None, served_model_name: str | None = None, dtype: str = "auto",
                device: str = "auto", attn_implementation: str = "auto") -> Loaded:
    """The model with every adapter loaded (`NAME=DIR` pairs, then each valid subdirectory of
    `adapters_dir` by its name), the router, and an engine over them (not started)."""
    base_name = served_model_name or model
    pairs = []
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise LoraError(f"--adapter {spec!r} must be NAME=DIR, e.g. --adapter sql=runs/sql")
        pairs.append((check_adapter_name(name, base_name), Path(path)))
    given = {name for name, _ in pairs}
    root, skipped = None, {}
    if adapters_dir is not None:
        root = Path(adapters_dir).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"--adapters-dir {adapters_dir} is not a directory")
        pairs += [(name, path) for name, path in discover_adapters(root, base_name, skipped) if name not in given]
    seen = [name for name, _ in pairs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise LoraError(f"adapter names {duplicates} are given more than once; each --adapter needs its own name")
    net = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
    tokenizer = load_tokenizer(model)
    for name, path in pairs:
        if name in given:
            check_adapter_files(path)
            load_adapter(net, path, name=name, activate=False)
        else:
            try:
                _load_servable(net, name, path)
            except (LoraError, OSError) as e:
                log.warning("adapters dir: skipping %s: %s", name, e)
                skipped[name] = str(e)
                continue
        log.info("adapter %s from %s", name, path)
    routing = None
    if router is not None:
        routing = Router.load(router, net, tokenizer)
    engine = Engine(net, tokenizer, config, routing)
    return Loaded(engine, base_name, root, skipped)


def _load_servable(net, name: str, path: Path) -> None:
    """Load `name` and check it can be served per row (what `Engine` needs of every adapter);
    on failure the model is left without it."""
    load_adapter(net, path, name=name, activate=False)
    try:
        StackedAdapters(net, [name])
    except LoraError:
        delete_adapter(net, name)
        raise


def run(loaded: Loaded, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (blocks)."""
    import uvicorn

    from .app import create_app

    app = create_app(loaded.engine, loaded.base_name, loaded.adapters_dir, loaded.skipped)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(loaded.engine.config.shutdown_timeout_s + 0.999))
    server = uvicorn.Server(config)
    log.info("serving %s with adapters %s", loaded.base_name, list(loaded.engine.adapters) or "(none)")
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn re-raises SIGINT once its graceful shutdown is done
        log.info("stopped")
