"""Serving the app: waitress in one process, stopped cleanly by Ctrl-C or SIGTERM.

One process, many threads: the in-memory cache and the single-flight table are
shared by every request only if every request is served by the same process.
Waitress was chosen by measurement (see the README and benchmarks/http_hits.py).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
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
    try:
        check_exposure(config)
    except ConfigError:
        engine.close()
        raise
    app = create_app(engine=engine)
    try:
        server = _listen(app, config)
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror or error}"
        ) from None
    port = server.effective_port
    host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6 literal
    url = f"http://{host}:{port}"
    log.info("runcache serving on %s (store %s)", url, engine.cache.store.description)
    # A machine-readable line for scripts and tests that start on port 0.
    print(f"runcache listening on {url}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Kill running commands first, so the threads serving them finish while
        # waitress waits for its threads, instead of writing to closed sockets.
        log.info("runcache stopping: killing %d running command(s)", engine.runner.running)
        engine.runner.kill_all()
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()  # returns once stop() raised SystemExit and the threads are done
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()
        server.close()
        sys.stdout.flush()


def check_exposure(config: Config) -> None:
    """Refuse to serve beyond loopback without a token: anyone reaching it could run commands."""
    if config.token or is_loopback(config.host):
        return
    raise ConfigError(
        f"refusing to listen on {config.host} without a token: anyone who can reach it could "
        "run commands on this machine; set RUNCACHE_TOKEN (or --token-file), or listen on "
        "127.0.0.1"
    )


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (unresolvable: no)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses
    )


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
