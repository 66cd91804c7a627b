"""``GET /api/pools``: each worker pool's live workers, queued and running commands.

The figures are Redis's (:meth:`runcache.engine.engine.Engine.pool_counts`), so every
server sharing the store answers the same; a server without a redis:// store has no
pools and answers an empty list. ``/metrics`` shows the same figures as gauges.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from runcache import wire
from runcache.web.operations import Answer, Operation
from runcache.web.responses import json_answer
from runcache.web.routes.commands import engine_of


async def list_pools(request: Request) -> Response:
    """The pools by name; a 503 (the one error shape) when Redis cannot be read."""
    return json_answer(wire.PoolList(await engine_of(request).pool_counts()))


OPERATIONS = (
    Operation(
        method="GET",
        path="/api/pools",
        endpoint=list_pools,
        operation_id="listPools",
        summary="Every worker pool a worker joined on this server's redis:// store, by "
        "name: its live workers, the commands queued for it and those running (an empty "
        "list without a redis:// store).",
        ok=Answer("The pools.", wire.PoolList),
        errors=("503",),
    ),
)
