"""`lorakit serve`: load the base model, its adapters and the router, and run the app under
uvicorn until SIGINT / SIGTERM.

Shutdown is graceful: uvicorn stops accepting connections and waits up to `shutdown_timeout_s`
for the responses in flight; then the engine fails whatever is still running (503) and stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraError
from ..io import load_adapter
from ..train.model_io import load_model, load_tokenizer
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


def load_server(model: str, adapters: list[str], adapters_dir: str | None = None, router: str | None = None,
                config: ServeConfig | None = None, served_model_name: str | None = None, dtype: str = "auto",
                device: str = "auto") -> Loaded:
    """The model with every adapter loaded (`NAME=DIR` pairs, then each valid subdirectory of
    `adapters_dir` by its name), the router, and an engine over them (not started)."""
    base_name = served_model_name or model
    pairs = []
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise LoraError(f"--adapter {spec!r} must be NAME=DIR, e.g. --adapter sql=runs/sql")
        pairs.append((check_adapter_name(name, base_name), Path(path)))
    root = None
    if adapters_dir is not None:
        root = Path(adapters_dir).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"--adapters-dir {adapters_dir} is not a directory")
        given = {name for name, _ in pairs}
        pairs += [(name, path) for name, path in discover_adapters(root, base_name) if name not in given]
    seen = [name for name, _ in pairs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise LoraError(f"adapter names {duplicates} are given more than once; each --adapter needs its own name")
    net = load_model(model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model)
    for name, path in pairs:
        check_adapter_files(path)
        load_adapter(net, path, name=name, activate=False)
        log.info("adapter %s from %s", name, path)
    routing = None
    if router is not None:
        from ..compose.router import Router

        routing = Router.load(router, net, tokenizer)
    engine = Engine(net, tokenizer, config, routing)
    return Loaded(engine, base_name, root)


def run(loaded: Loaded, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (blocks)."""
    import uvicorn

    from .app import create_app

    app = create_app(loaded.engine, loaded.base_name, loaded.adapters_dir)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(loaded.engine.config.shutdown_timeout_s + 0.999))
    server = uvicorn.Server(config)
    log.info("serving %s with adapters %s", loaded.base_name, list(loaded.engine.adapters) or "(none)")
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn re-raises SIGINT once its graceful shutdown is done
        log.info("stopped")
