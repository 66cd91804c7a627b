"""Serving the app: waitress in one process, stopped cleanly by Ctrl-C or SIGTERM.

One process, many threads: the in-memory cache and the single-flight table are
shared by every request only if every request is served by the same process.
Waitress was chosen by measurement (see the README and benchmarks/http_hits.py).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any

from flask import Flask

from waitress.server import create_server

from runcache.app import create_app
from runcache.config import Config
from runcache.errors import ConfigError
from runcache.service import Engine

log = logging.getLogger(__name__)


def serve(engine: Engine) -> None:
    """Serve the API until interrupted, then kill running commands and close the store."""
    config = engine.config
    app = create_app(engine=engine)
    try:
        server = _listen(app, config)
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror or error}"
        ) from None
    port = server.effective_port
    url = f"http://{config.host}:{port}"
    log.info("runcache serving on %s (store %s)", url, engine.cache.store.description)
    # A machine-readable line for scripts and tests that start on port 0.
    print(f"runcache listening on {url}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.info("runcache stopping: killing %d running command(s)", engine.runner.running)
        engine.close()
        server.close()
        sys.stdout.flush()


def _listen(app: Flask, config: Config) -> Any:
    return create_server(
        app,
        host=config.host,
        port=config.port,
        threads=config.threads,
        # Commands may run for minutes; a connection waiting on one is not idle.
        channel_timeout=config.max_timeout + 60,
        asyncore_use_poll=True,
        ident="runcache",
    )
