"""``GET /metrics``, and the middleware that times every request by its route's template."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runcache.engine.metrics import CONTENT_TYPE, OTHER_ROUTE, Metrics
from runcache.errors import StoreError
from runcache.web.operations import Answer, Operation
from runcache.web.routes.commands import engine_of


async def metrics(request: Request) -> Response:
    """The Prometheus text: the counters, and the store's size and the pools read now."""
    engine = engine_of(request)
    stats = await engine.cache_stats()  # the last known figures while the store is down
    try:
        pools = await engine.pool_counts()
    except StoreError:  # logged by the engine; a scrape still answers the other figures
        pools = []
    text = engine.metrics.exposition(stats.size, stats.bytes, pools)
    return Response(text, media_type=CONTENT_TYPE)


OPERATIONS = (
    Operation(
        method="GET",
        path="/metrics",
        endpoint=metrics,
        operation_id="metrics",
        summary="Prometheus metrics in the text format: counts no clear resets, "
        "durations, the cache's size now, and with a redis:// store each worker pool's "
        "workers, queued and running commands.",
        ok=Answer("The metrics.", media="text/plain"),
    ),
)


class RequestTimer:
    """Times each HTTP request into ``runcache_http_request_duration_seconds{route,method,code}``,
    and each answer streamed as events into ``runcache_http_stream_duration_seconds{route}``.

    The route label is the template of the route that served it (``/api/jobs/{job_id}``),
    which the router leaves in the scope, never the path a client sent: a label per
    raw path would grow without bound. A request the token gate refused never
    reached the router, so its route is looked up here; a path no route serves
    is :data:`~runcache.engine.metrics.OTHER_ROUTE`. The code is the status the answer
    began with (``500`` when the app failed before answering). An answer of type
    ``text/event-stream`` is a stream, open as long as its reader follows: timed
    apart, so that request latency stays what an alert on it means.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        answer = _Answer(send)
        try:
            await self.app(scope, receive, answer.send)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = route.path if isinstance(route, Route) else self._template(scope)
            if answer.streamed:
                self._metrics.stream(template, seconds)
            else:
                self._metrics.request((template, scope["method"], answer.code), seconds)

    def _template(self, scope: Scope) -> str:
        for route in self._routes:
            if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE:
                return route.path
        return OTHER_ROUTE


class _Answer:
    """What a request's answer began with: its status code, and whether it streams events."""

    __slots__ = ("_send", "code", "streamed")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.code = "500"
        self.streamed = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code = _CODES.get(message["status"]) or str(message["status"])
            for name, value in message.get("headers", ()):
                if name == b"content-type" and value.startswith(b"text/event-stream"):
                    self.streamed = True
        await self._send(message)


#: Status codes as label text, made once rather than at every request.
_CODES = {code: str(code) for code in range(100, 600)}
