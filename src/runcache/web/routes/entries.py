"""The cache entries API: list what the cache holds, read and page an entry, delete
entries one by one or by command (the deletions need the admin token).

The answers are built by :mod:`runcache.engine.entry_answers`; this module reads the
request's parameters.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runcache import wire
from runcache.engine import entry_answers
from runcache.engine.callers import caller_of
from runcache.engine.job_answers import DEFAULT_PAGE_BYTES, MAX_OFFSET, MAX_PAGE_BYTES
from runcache.web.responses import json_answer
from runcache.web.routes.commands import admin_only, client_of, engine_of, read_body
from runcache.web.routes.jobs import int_param, stream_param


def _key(request: Request) -> str:
    key: str = request.path_params["cache_key"]
    return key


async def list_entries(request: Request) -> Response:
    prefix = request.query_params.get("prefix", "")
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)
    limit = int_param(request, "limit", entry_answers.DEFAULT_LIST, 1, entry_answers.MAX_LIST)
    return json_answer(await entry_answers.listing(engine_of(request), prefix, offset, limit))


async def entry_detail(request: Request) -> Response:
    return json_answer(await entry_answers.detail(engine_of(request), _key(request)))


async def entry_output(request: Request) -> Response:
    stream = stream_param(request)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)
    limit = int_param(request, "limit", DEFAULT_PAGE_BYTES, 1, MAX_PAGE_BYTES)
    answer = await entry_answers.page(engine_of(request), _key(request), stream, offset, limit)
    return json_answer(answer)


@admin_only
async def delete_entry(request: Request) -> Response:
    engine = engine_of(request)
    answer = await entry_answers.delete(engine, _key(request), client_of(request))
    engine.audit.removed(
        caller_of(request.scope), "delete", answer.deleted, cache_key=_key(request)
    )
    return json_answer(answer)


@admin_only
async def invalidate(request: Request) -> Response:
    engine = engine_of(request)
    body = wire.decode_invalidate_request(await read_body(request, engine.config.max_body_bytes))
    answer = await entry_answers.invalidate(engine, body, client_of(request))
    how = {"prefix": body.prefix} if isinstance(body.prefix, str) else {"glob": str(body.glob)}
    engine.audit.removed(caller_of(request.scope), "invalidate", answer.deleted, **how)
    return json_answer(answer)


ROUTES = [
    Route("/api/cache/entries", list_entries, methods=["GET"]),
    Route("/api/cache/entries/{cache_key}", entry_detail, methods=["GET"]),
    Route("/api/cache/entries/{cache_key}", delete_entry, methods=["DELETE"]),
    Route("/api/cache/entries/{cache_key}/output", entry_output, methods=["GET"]),
    Route("/api/cache/invalidate", invalidate, methods=["POST"]),
]
