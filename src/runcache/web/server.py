"""Serving the app: uvicorn in this process, or several processes on one port.

One process serves every connection on one event loop: cache hits are answered
on the loop, and requests waiting on a command hold no thread. With
``--workers N`` (a shared store only) the port is bound once and N forked
processes accept on it, each with an engine of its own, their Prometheus
metrics summed through a private directory this process makes for them. uvicorn was chosen by
measurement against granian (see docs/benchmarks.md and benchmarks/asgi_servers.py).

SIGTERM or Ctrl-C kills every running command's group first, so the requests
waiting on them answer at once, then lets the server finish those requests and
exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.engine.metrics import multiprocess_directory, worker_ended
from runcache.errors import ConfigError
from runcache.web.app import create_app
from runcache.web.protocol import GuardedHttpProtocol

log = logging.getLogger(__name__)

#: Seconds in-flight requests get to finish after a stop; their commands are dead by then.
GRACEFUL_SECONDS = 10

#: Connections the kernel queues before the server accepts them.
BACKLOG = 4096


def serve(config: Config) -> None:
    """Serve the API until interrupted; print the listening line once the port is bound.

    Every start-up error (a bad store URL, an allowlisted name not found, a
    port in use) is raised before the listening line, as one ConfigError.
    """
    check_exposure(config)
    if config.workers == 1:
        engine = Engine.from_config(config)
        try:
            listener = _bind(config)
        except ConfigError:
            engine.close()
            raise
        with listener:
            serve_process(engine, listener, _announce(config, listener))
    else:
        Engine.from_config(config).close()  # the workers' settings, checked before forking
        listeners = _bind_each(config)
        try:
            with multiprocess_directory() as metrics_dir:
                _supervise(config, listeners, _announce(config, listeners[0]), metrics_dir)
        finally:
            for listener in listeners:
                listener.close()
    sys.stdout.flush()


def _announce(config: Config, listener: socket.socket) -> str:
    """Print the machine-readable line scripts and tests that start on port 0 read."""
    port = listener.getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6 literal
    url = f"http://{host}:{port}"
    print(f"runcache listening on {url}", flush=True)
    return url


def serve_process(engine: Engine, listener: socket.socket, url: str) -> None:
    """One server process: the engine's app on uvicorn on ``listener``, then the engine closed."""
    log.info(
        "runcache serving on %s (store %s, pid %d)",
        url,
        engine.cache.store.description,
        os.getpid(),
        extra={"url": url, "store": engine.cache.store.description, "pid": os.getpid()},
    )
    try:
        server = _Server(engine, _uvicorn_config(create_app(engine=engine), engine.config))
        server.run(sockets=[listener])
    finally:
        engine.close()


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by a signal the way runcache stops: commands first, exit 0."""

    def __init__(self, engine: Engine, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.engine = engine

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version raises the signal again once it is done, which
        # would end the process by SIGTERM instead of exit status 0.
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("runcache stopping: killing %d running command(s)", self.engine.runner.running)
            # Not in the handler itself: it may have interrupted a holder of the runner's lock.
            threading.Thread(target=self.engine.runner.kill_all, name="runcache-stop").start()
        super().handle_exit(sig, frame)


def _uvicorn_config(app: ASGIApp, config: Config) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=GuardedHttpProtocol.configured(
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            write_timeout=config.write_timeout,
            max_header_bytes=config.max_header_bytes,
        ),
        lifespan="on",
        ws="none",  # no WebSocket routes: an Upgrade header is just a header
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=config.keepalive_timeout,
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        backlog=BACKLOG,
    )


def _bind(config: Config, port: int | None = None, share: bool = False) -> socket.socket:
    """A listening socket on the configured address; ``share`` lets others bind the port too."""
    port = config.port if port is None else port
    try:
        infos = socket.getaddrinfo(
            config.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(address)
        listener.listen(BACKLOG)
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {config.host}:{port}: {error.strerror or error}"
        ) from None
    listener.set_inheritable(True)
    return listener


def _bind_each(config: Config) -> list[socket.socket]:
    """One listening socket per worker, all on one port (``SO_REUSEPORT``).

    The kernel spreads new connections over the sockets evenly; with one
    socket shared by every worker, whichever worker woke first would take most
    of them. All are bound before the listening line, so a client that reads
    it never finds the port closed, and a restarted worker takes over its
    predecessor's socket with the connections queued on it. The port is first
    bound alone, so a port that anything holds (another runcache's workers
    included) is refused as for a single server, not silently shared.
    """
    with _bind(config) as alone:
        port = alone.getsockname()[1]
    listeners: list[socket.socket] = []
    try:
        for _ in range(config.workers):
            listeners.append(_bind(config, port, share=True))
    except ConfigError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _supervise(config: Config, listeners: list[socket.socket], url: str, metrics_dir: str) -> None:
    """Fork a server process for each listener; restart any that dies.

    Forked before this process has an event loop, a thread or a store
    connection, so each worker starts clean. SIGTERM or Ctrl-C is passed on to
    every worker, which stops as a single server would. A worker that ended is
    marked so in ``metrics_dir``: what it was running no longer counts.
    """
    workers: dict[int, socket.socket] = {}
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def start(listener: socket.socket) -> None:
        workers[_fork_worker(config, listener, url)] = listener

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for listener in listeners:
            start(listener)
        while workers:
            pid, status = os.wait()
            listener = workers.pop(pid)
            worker_ended(pid, metrics_dir)
            if not stopping.is_set():
                log.error("worker %d ended (status %d); starting another", pid, status)
                start(listener)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fork_worker(config: Config, listener: socket.socket, url: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        serve_process(Engine.from_config(config), listener, url)
    except BaseException:  # noqa: B036 - a worker must never return into the supervisor's loop
        log.exception("worker %d failed", os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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
