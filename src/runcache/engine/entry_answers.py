"""What clients see of the cache's entries: list, read, page, delete and invalidate them.

The HTTP routes (:mod:`runcache.web.routes.entries`) call these, and so can any other
layer over the engine: each takes the engine and returns a :mod:`runcache.wire`
shape, or raises the :class:`~runcache.errors.RuncacheError` a client reads.
Nothing here knows of HTTP, and nothing here counts a hit or a miss: looking at
the cache must not change the statistics it reports. A store that is down
raises :class:`~runcache.errors.StoreError` (a 503).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from typing import Any

import msgspec

from runcache import wire
from runcache.engine.engine import Engine
from runcache.engine.job_answers import as_page, read_final
from runcache.errors import NotFound
from runcache.stores.base import CommandMatch, EntryInfo, any_command

log = logging.getLogger("runcache")

#: A listing's bounds, declared with the query that asks for one (``wire.EntryListQuery``).
DEFAULT_LIST = wire.DEFAULT_LIST
MAX_LIST = wire.MAX_LIST


def _entry_fields(info: EntryInfo) -> dict[str, Any]:
    return {
        "cache_key": info.key,
        "command": info.command,
        "bytes": info.size,
        "created_at": round(info.created_at, 6),
        "expires_at": round(info.expires_at, 6),
        "hits": info.hits,
        "return_code": info.return_code,
        "scope": info.scope or None,
    }


async def listing(
    engine: Engine, prefix: str, offset: int, limit: int, scope: str | None = None
) -> wire.CacheEntryList:
    """``GET /api/cache/entries``: live entries whose command starts with ``prefix`` (of
    ``scope`` alone, given one), newest first, ``limit`` of them from ``offset``."""
    # One more than asked: is there a next page?
    found = await engine.cache.entries(prefix, offset, limit + 1, scope)
    return wire.CacheEntryList(
        entries=[wire.CacheEntry(**_entry_fields(info)) for info in found[:limit]],
        next_offset=offset + limit if len(found) > limit else None,
    )


async def _find(engine: Engine, key: str) -> tuple[EntryInfo, bytes]:
    found = await engine.cache.entry(key)
    if found is None:
        raise NotFound(f"no cache entry {key}: never stored, expired, deleted or cleared")
    return found


async def detail(engine: Engine, key: str) -> wire.CacheEntryDetail:
    """``GET /api/cache/entries/{cache_key}``: the entry and the result it holds."""
    info, value = await _find(engine, key)
    result = msgspec.json.decode(value, type=wire.StoredResult)
    return wire.CacheEntryDetail(**_entry_fields(info), result=result)


class _Output(msgspec.Struct):
    """The streams of a stored result, decoded without the rest."""

    stdout: str
    stderr: str


async def page(engine: Engine, key: str, stream: str, offset: int, limit: int) -> wire.JobOutput:
    """``GET /api/cache/entries/{cache_key}/output``: a page of a stored stream, cut as a
    job's finished output is: offsets count bytes of the stored text's UTF-8, and a page
    never splits a character."""
    _, value = await _find(engine, key)
    output = msgspec.json.decode(value, type=_Output)
    data = (output.stdout if stream == "stdout" else output.stderr).encode()
    return as_page(*read_final(data, offset, limit))


async def delete(engine: Engine, key: str, client: str = "-") -> wire.Deleted:
    """``DELETE /api/cache/entries/{cache_key}``."""
    if not await engine.cache.delete(key):
        raise NotFound(f"no cache entry {key} to delete: never stored, expired, deleted or cleared")
    log.info("%s deleted cache entry %s", client, key)
    return wire.Deleted(deleted=1)


def command_match(request: wire.InvalidateRequest) -> CommandMatch:
    """The test of a command that an invalidation asks for: a prefix, or a shell-style
    pattern the whole command must match (``*`` matches ``/`` and spaces too); every
    command when it names only a scope."""
    if isinstance(request.prefix, str):
        prefix = request.prefix
        return lambda command: command.startswith(prefix)
    if not isinstance(request.glob, str):
        return any_command
    pattern = re.compile(fnmatch.translate(request.glob))
    return lambda command: pattern.match(command) is not None


async def invalidate(
    engine: Engine, request: wire.InvalidateRequest, client: str = "-"
) -> wire.Deleted:
    """``POST /api/cache/invalidate``: delete every live entry whose command matches (of
    the request's scope alone, when it names one)."""
    scope = request.scope if isinstance(request.scope, str) else None
    deleted = await engine.cache.delete_matching(command_match(request), scope)
    how = " and ".join(f"{name} {value!r}" for name, value in invalidated_by(request).items())
    log.info("%s invalidated %d cache entries by %s", client, deleted, how)
    return wire.Deleted(deleted=deleted)


def invalidated_by(request: wire.InvalidateRequest) -> dict[str, str]:
    """What an invalidation names (``prefix``, ``glob``, ``scope``), for its log and audit
    lines."""
    return {
        name: value
        for name in ("prefix", "glob", "scope")
        if isinstance(value := getattr(request, name), str)
    }
