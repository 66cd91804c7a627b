"""The cache entries API: list what the cache holds, read and page an entry, delete
entries one by one or by command (the deletions need the admin token).

The answers are built by :mod:`runcache.engine.entry_answers`; this module reads the
request's parameters.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from runcache import wire
from runcache.engine import entry_answers
from runcache.engine.callers import caller_of
from runcache.web.operations import Answer, Operation
from runcache.web.responses import json_answer
from runcache.web.routes.commands import client_of, engine_of, read_body


def _key(request: Request) -> str:
    key: str = request.path_params["cache_key"]
    return key


async def list_entries(request: Request) -> Response:
    query = wire.decode_query(wire.EntryListQuery, request.query_params)
    answer = await entry_answers.listing(
        engine_of(request), query.prefix, query.offset, query.limit, query.scope
    )
    return json_answer(answer)


async def entry_detail(request: Request) -> Response:
    return json_answer(await entry_answers.detail(engine_of(request), _key(request)))


async def entry_output(request: Request) -> Response:
    query = wire.decode_query(wire.PageQuery, request.query_params)
    answer = await entry_answers.page(
        engine_of(request), _key(request), query.stream, query.offset, query.limit
    )
    return json_answer(answer)


async def delete_entry(request: Request) -> Response:
    engine = engine_of(request)
    answer = await entry_answers.delete(engine, _key(request), client_of(request))
    engine.audit.removed(
        caller_of(request.scope), "delete", answer.deleted, cache_key=_key(request)
    )
    return json_answer(answer)


async def invalidate(request: Request) -> Response:
    engine = engine_of(request)
    body = wire.decode_invalidate_request(await read_body(request, engine.config.max_body_bytes))
    answer = await entry_answers.invalidate(engine, body, client_of(request))
    how = entry_answers.invalidated_by(body)
    engine.audit.removed(caller_of(request.scope), "invalidate", answer.deleted, **how)
    return json_answer(answer)


OPERATIONS = (
    Operation(
        method="GET",
        path="/api/cache/entries",
        endpoint=list_entries,
        operation_id="listEntries",
        summary="Live cache entries, newest first; counts no hit or miss.",
        ok=Answer("A page of entries.", wire.CacheEntryList),
        query=wire.EntryListQuery,
        errors=("400", "503"),
    ),
    Operation(
        method="GET",
        path="/api/cache/entries/{cache_key}",
        endpoint=entry_detail,
        operation_id="getEntry",
        summary="One live entry and the result it holds; counts no hit.",
        ok=Answer("The entry.", wire.CacheEntryDetail),
        errors=("404", "503"),
    ),
    Operation(
        method="DELETE",
        path="/api/cache/entries/{cache_key}",
        endpoint=delete_entry,
        operation_id="deleteEntry",
        summary="Delete one live entry; needs the admin token when tokens are "
        "on. Counts no eviction.",
        ok=Answer("Deleted.", wire.Deleted),
        errors=("404", "503"),
        admin=True,
    ),
    Operation(
        method="GET",
        path="/api/cache/entries/{cache_key}/output",
        endpoint=entry_output,
        operation_id="entryOutput",
        summary="A page of one stream of a stored result, as a finished job's output is paged: "
        "offsets count bytes of the stored text's UTF-8, and data never splits a "
        "character.",
        ok=Answer("The page.", wire.JobOutput),
        query=wire.PageQuery,
        errors=("400", "404", "410", "503"),
    ),
    Operation(
        method="POST",
        path="/api/cache/invalidate",
        endpoint=invalidate,
        operation_id="invalidateEntries",
        summary="Delete every live entry whose command starts with `prefix`, or matches the "
        "shell-style pattern `glob` as a whole (at most one of them), of the `scope` alone "
        "when it names one (a scope alone: all of its entries); needs the admin token when "
        "tokens are on. Statistics are not reset.",
        ok=Answer("How many entries went.", wire.Deleted),
        body=wire.InvalidateRequest,
        errors=("400", "413", "503"),
        admin=True,
    ),
)
