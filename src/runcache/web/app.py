"""The app factory: a Starlette app around one engine: the HTTP API, MCP at ``/mcp`` and
Prometheus metrics at ``/metrics``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from runcache import logs
from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.errors import RuncacheError
from runcache.web import dashboard, openapi, operations
from runcache.web.auth import TokenGate
from runcache.web.operations import Operation
from runcache.web.origins import OriginGuard
from runcache.web.routes import commands, entries, jobs, metrics, pools, processes
from runcache.web.routes.mcp import McpEndpoint
from runcache.web.streams import StreamSlots

#: Every operation the API serves, in the order the router tries them; the OpenAPI
#: document describes these and only these.
OPERATIONS: tuple[Operation, ...] = (
    *commands.OPERATIONS,
    *entries.OPERATIONS,
    *jobs.OPERATIONS,
    *pools.OPERATIONS,
    *processes.OPERATIONS,
    *dashboard.OPERATIONS,
    *metrics.OPERATIONS,
    openapi.OPERATION,
)


def create_app(config: Config | None = None, engine: Engine | None = None) -> Starlette:
    """Build the app from a config (defaults, then the environment, when none is given).

    ``engine`` lets the server, the CLI and the tests supply one already built;
    otherwise the app builds its own from the config. Whoever built the engine
    closes it.
    """
    if engine is None:
        engine = Engine.from_config(config or Config.load())
    streams = StreamSlots.for_config(engine.config)
    mcp_endpoint = McpEndpoint(engine, streams)
    # /mcp is MCP's own protocol, described by its tools rather than by OpenAPI.
    routes = [*operations.routes(OPERATIONS), Route("/mcp", mcp_endpoint)]
    middleware = []
    if engine.metrics.enabled:  # outermost, so that requests the token gate refuses count too
        middleware.append(Middleware(metrics.RequestTimer, metrics=engine.metrics, routes=routes))
    # Before the token gate, so a browser page of another origin is refused tokens or not.
    middleware.append(
        Middleware(
            OriginGuard,
            host=engine.config.host,
            allowed_hosts=engine.config.host_names,
            allowed_origins=engine.config.origins,
        )
    )
    if engine.config.token:
        middleware.append(
            Middleware(
                TokenGate,
                tokens=engine.config.plain_tokens,
                admin_token=engine.config.admin_secret,
                admin_routes=operations.admin_routes(OPERATIONS),
            )
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.serve_jobs()  # with a shared store: this instance's jobs on its board
        async with mcp_endpoint.serving(), engine.history.recording(engine.cache_stats):
            yield
        await engine.aclose()  # on the loop that served, before it ends

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            RuncacheError: commands.on_runcache_error,
            HTTPException: commands.on_http_error,
            Exception: commands.on_unexpected,
        },
    )
    app.state.engine = engine
    app.state.streams = streams  # the event streams' places, taken by the job event routes
    app.state.operations = OPERATIONS  # what /openapi.json describes
    return app


def configure_logging(level: str, log_format: str = "text") -> None:
    """One-line logs on stderr, readable or JSON (:mod:`runcache.logs`); the per-request
    access log stays off.

    uvicorn's own start and stop lines repeat runcache's, so only its warnings show
    (through the root logger's handler, so in the same format).
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.root.level))
