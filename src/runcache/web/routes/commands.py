"""The HTTP API: Starlette routes over the engine, and every error as the one JSON shape.

Each route is a short coroutine: read and check the request against its
declared shape (:mod:`runcache.wire`), call the engine, encode its typed
answer. A cache hit on the memory store runs from the first byte read to the
last byte written on the event loop.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from runcache import wire
from runcache.engine import job_answers
from runcache.engine.callers import caller_of
from runcache.engine.engine import Engine
from runcache.errors import BadRequest, MethodNotAllowed, NotFound, RuncacheError, TooLarge
from runcache.web.operations import Answer, Operation
from runcache.web.responses import (
    STREAM_THRESHOLD,
    JSONBytes,
    ResultResponse,
    error_answer,
    json_answer,
)

log = logging.getLogger(__name__)

#: The body of ``POST /api/cache/clear``, fixed to the letter by the user's specification.
CLEAR_BODY = wire.encode(wire.Cleared())

_LIVE_BODY = wire.encode(wire.Live())


def engine_of(request: Request) -> Engine:
    """The engine of the app serving this request."""
    found: Engine = request.app.state.engine
    return found


def client_of(request: Request) -> str:
    return request.client.host if request.client else "-"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to pass ``limit``.

    A declared ``Content-Length`` over the limit is refused before a byte of
    the body is read; a chunked body is refused the moment it passes the limit.
    """
    declared = wire.whole_number(request.headers.get("content-length") or "")
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # Closed mid-body: the client hung up, or the server cut it (a bad chunk,
        # the body deadline). The client's doing, not an unexpected error to log.
        raise BadRequest("the connection closed before the request body ended") from None
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body is larger than the limit of {limit} bytes")


async def run_command(request: Request) -> Response:
    """One call into the engine: a run answered (a hit on the loop), or a job started."""
    engine = engine_of(request)
    command = wire.decode_command_request(await read_body(request, engine.config.max_body_bytes))
    caller = caller_of(request.scope)
    if command.background:
        job, _ = await engine.start(command, caller)
        return json_answer(await job_answers.accepted(job), 202)
    outcome = await engine.run(command, caller, gone=lambda: _disconnected(request))
    if len(outcome.body) < STREAM_THRESHOLD:
        return JSONBytes(outcome.to_json())
    return ResultResponse(outcome.body, outcome.tail)


async def cache_stats(request: Request) -> Response:
    return json_answer(await engine_of(request).cache_stats())


async def policy(request: Request) -> Response:
    return json_answer(engine_of(request).policy.answer())


async def cache_history(request: Request) -> Response:
    return json_answer(engine_of(request).history.answer())


async def clear_cache(request: Request) -> Response:
    engine = engine_of(request)
    await engine.clear()
    engine.audit.removed(caller_of(request.scope), "clear", None)
    return JSONBytes(CLEAR_BODY)


async def telemetry(request: Request) -> Response:
    return json_answer(engine_of(request).telemetry.snapshot())


async def health(request: Request) -> Response:
    return json_answer(await engine_of(request).health())


async def livez(request: Request) -> Response:
    """Liveness for load balancers: answers without touching the store or the machine."""
    return JSONBytes(_LIVE_BODY)


OPERATIONS = (
    Operation(
        method="POST",
        path="/api/command",
        endpoint=run_command,
        operation_id="runCommand",
        summary="Run a command, or answer it from the cache.",
        ok=Answer("The command's result.", wire.CommandResult),
        accepted=Answer(
            'With "background": true, at once: the job that runs the command '
            "(already completed when the cache answered it).",
            wire.JobAccepted,
        ),
        body=wire.CommandRequest,
        # 403 without tokens too: the run context rules (--allow-cwd, --env-allow).
        errors=("400", "403", "413", "503"),
    ),
    Operation(
        method="GET",
        path="/api/cache/stats",
        endpoint=cache_stats,
        operation_id="cacheStats",
        summary="The cache's statistics.",
        ok=Answer("Counts and sizes.", wire.CacheStats),
    ),
    Operation(
        method="GET",
        path="/api/policy",
        endpoint=policy,
        operation_id="getPolicy",
        summary="The rules of --policy, in the order they are matched: what each sets where "
        "a request leaves it out.",
        ok=Answer("The rules.", wire.PolicyAnswer),
    ),
    Operation(
        method="GET",
        path="/api/cache/history",
        endpoint=cache_history,
        operation_id="cacheHistory",
        summary="The cache's hits and misses since the last clear, sampled every few seconds "
        "by this server process: the last hour of samples, oldest first.",
        ok=Answer("The samples.", wire.CacheHistory),
    ),
    Operation(
        method="POST",
        path="/api/cache/clear",
        endpoint=clear_cache,
        operation_id="clearCache",
        summary="Empty the cache and reset its statistics, as one step. Takes any body or none; "
        "needs the admin token when tokens are on.",
        ok=Answer("The cache is empty.", wire.Cleared),
        errors=("503",),
        admin=True,
    ),
    Operation(
        method="GET",
        path="/api/telemetry",
        endpoint=telemetry,
        operation_id="telemetry",
        summary="What the server ran, and the machine it runs on.",
        ok=Answer("Execution counts and system metrics.", wire.Telemetry),
    ),
    Operation(
        method="GET",
        path="/health",
        endpoint=health,
        operation_id="health",
        summary="Health, cache statistics and telemetry; open without a token.",
        ok=Answer("The server's health.", wire.Health),
        open=True,
    ),
    Operation(
        method="GET",
        path="/livez",
        endpoint=livez,
        operation_id="livez",
        summary="Liveness: answers without touching the store.",
        ok=Answer("The process is serving.", wire.Live),
        open=True,
    ),
)


async def on_runcache_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RuncacheError)
    return error_answer(error)


async def on_http_error(request: Request, error: Exception) -> Response:
    """Routing's own errors (no such path, a method it does not take) as runcache errors."""
    assert isinstance(error, HTTPException)
    path, method = request.url.path, request.method
    if error.status_code == 405:
        allowed = (*_methods_at(request), "OPTIONS")
        if method == "OPTIONS":  # what the path takes: the answer HTTP gives OPTIONS
            return Response(status_code=200, headers={"Allow": ", ".join(allowed)})
        return error_answer(MethodNotAllowed(f"method {method} is not allowed on {path}", allowed))
    if error.status_code == 404:
        return error_answer(NotFound(f"no endpoint at {path}; GET /openapi.json lists them all"))
    problem = RuncacheError(error.detail)
    problem.status = error.status_code
    return error_answer(problem)


#: The order ``Allow`` lists methods in: a route keeps its methods in a set, whose order
#: changes from one process to the next.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _methods_at(request: Request) -> list[str]:
    """The methods of every route at the request's path, in a fixed order: a path may
    have a route per method (``GET`` and an admin-only ``DELETE``, say)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.path_regex.match(request.scope["path"]):
            methods.update(route.methods or ())
    return sorted(methods, key=lambda method: (_METHOD_ORDER + (method,)).index(method))


async def on_unexpected(request: Request, error: Exception) -> Response:
    log.error("unexpected error on %s %r", request.method, request.url.path, exc_info=error)
    return error_answer(RuncacheError("internal error; see the server log"))
