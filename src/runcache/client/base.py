"""What both clients share: the operations, the requests they send, and ``with``.

The CLI's client commands and the MCP adapter talk to a runcache server over HTTP
(:class:`~runcache.client.http.Client`) or to an engine in their own process
(:class:`~runcache.client.local.LocalClient`). :class:`BaseClient` declares the
operations once, with their typed answers (:mod:`runcache.wire`), and checks each
request as the server checks it, so a bad one fails with the very message the
API would answer, before anything is sent or run, whichever client it went to.
Each client then only carries a request to where it is answered (as httpx's
``Client`` and ``AsyncClient`` share ``BaseClient``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from runcache import wire
from runcache.client import sse
from runcache.errors import BadRequest
from runcache.wire import CacheStats, Cleared, CommandResult, Health, Telemetry

#: The answer to a clear, as the contract fixes it for ``POST /api/cache/clear``.
CLEARED = Cleared()

#: The events that end a job's event stream: its result, or why it never ran.
FINAL_EVENTS = frozenset({"result", "error"})

_Self = TypeVar("_Self", bound="BaseClient")


class BaseClient(ABC):
    """A runcache, wherever it runs; every failure is a :class:`~runcache.errors.RuncacheError`
    with one line. ``with`` closes it."""

    description: str

    # -- runs: a request is a wire.RunRequest, or a command string with every default ----

    def execute(self, request: wire.RunRequest | str) -> CommandResult:
        """Run a command through the cache and wait for its result, as long as the
        server lets it run."""
        return self._execute(run_request(request))

    def start(self, request: wire.RunRequest | str) -> wire.JobAccepted:
        """Start (or join) a run in the background: its job, at once (already ended when
        the cache answered it)."""
        return self._start(run_request(request, background=True))

    @abstractmethod
    def _execute(self, request: wire.CommandRequest) -> CommandResult: ...

    @abstractmethod
    def _start(self, request: wire.CommandRequest) -> wire.JobAccepted: ...

    # -- jobs -----------------------------------------------------------------------------

    @abstractmethod
    def job(self, job_id: str) -> wire.JobDetail:
        """One job, with its result once it has ended."""

    @abstractmethod
    def output(
        self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int | None = None
    ) -> wire.JobOutput:
        """A page of one stream of a job (``limit`` None: the server's default page)."""

    @abstractmethod
    def events(self, job_id: str, last_event_id: str | None = None) -> sse.EventStream:
        """A job's events as they come: ``stdout`` and ``stderr`` chunks (from the start,
        or after ``last_event_id``), then its ``result`` (or ``error``), then the end."""

    @abstractmethod
    def leave(self, job_id: str) -> wire.JobAction:
        """Give up a job this client started or joined in the background: the run is
        cancelled if nobody else wants it."""

    # -- the cache ------------------------------------------------------------------------

    @abstractmethod
    def cache_stats(self) -> CacheStats: ...

    @abstractmethod
    def clear(self) -> Cleared:
        """Empty the cache and reset its statistics (the admin token's, when there is one)."""

    @abstractmethod
    def entries(
        self, prefix: str = "", offset: int = 0, limit: int | None = None, scope: str | None = None
    ) -> wire.CacheEntryList:
        """Live entries whose command starts with ``prefix`` (of ``scope`` alone, given
        one), newest first."""

    @abstractmethod
    def entry(self, key: str) -> wire.CacheEntryDetail:
        """One live entry and the result it holds (counts no hit)."""

    @abstractmethod
    def delete_entry(self, key: str) -> wire.Deleted:
        """Delete one live entry (the admin token's, when there is one)."""

    def entry_key(self, given: str) -> str:
        """The whole key ``given`` is a unique prefix of (at least ``MIN_PREFIX``
        characters), by listing every live entry; else ``given`` as it is."""
        keys: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = self.entries(offset=offset, limit=wire.MAX_LIST)
            keys.extend(entry.cache_key for entry in page.entries)
            offset = page.next_offset
        return unique_prefix(given, keys, "cache entry")

    def invalidate(
        self, prefix: str | None = None, glob: str | None = None, scope: str | None = None
    ) -> wire.Deleted:
        """Delete the entries whose command starts with ``prefix`` or matches ``glob``, of
        ``scope`` alone when given (the admin token's, when there is one)."""
        return self._invalidate(invalidate_request(prefix, glob, scope))

    @abstractmethod
    def _invalidate(self, request: wire.InvalidateRequest) -> wire.Deleted: ...

    # -- the service ----------------------------------------------------------------------

    @abstractmethod
    def health(self) -> Health: ...

    @abstractmethod
    def telemetry(self) -> Telemetry: ...

    @abstractmethod
    def close(self) -> None:
        """Release what the client holds; a request still waiting is cut."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: The fewest characters of a job id or cache key the CLI takes for the whole (as
#: docker takes an id's prefix): fewer would too often name several.
MIN_PREFIX = 6

#: The most candidates an ambiguous prefix names.
_CANDIDATES_SHOWN = 5


def unique_prefix(given: str, known: Iterable[str], noun: str) -> str:
    """The one of ``known`` that starts with ``given``; ``given`` itself when it is one of
    them or names none (the server then answers that there is no such one, in its words).

    Resolved by the client, from a listing, so the API keeps taking whole ids only.
    """
    known = list(known)
    if given in known:
        return given
    found = sorted(item for item in known if item.startswith(given))
    if not found:
        return given
    if len(given) < MIN_PREFIX:
        raise BadRequest(
            f"{given!r} is too short to name a {noun}: give at least {MIN_PREFIX} characters"
        )
    if len(found) > 1:
        shown = ", ".join(found[:_CANDIDATES_SHOWN])
        more = len(found) - _CANDIDATES_SHOWN
        raise BadRequest(
            f"{given!r} starts {len(found)} {noun} ids: {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; give more characters"
        )
    return found[0]


def run_request(request: wire.RunRequest | str, background: bool = False) -> wire.CommandRequest:
    """A ``POST /api/command`` body for ``request``, checked as the server checks it.

    Encoded and decoded once: a bad value (a negative timeout, say: a Struct made in
    code is not checked) fails here with the very message the server would answer.
    A field left None is left out, as an absent field takes the server's default.
    """
    fields: dict[str, Any] = (
        {"command": request}
        if isinstance(request, str)  # a run's fields only (not an MCP call's own, say)
        else {name: getattr(request, name) for name in wire.RunRequest.__struct_fields__}
    )
    fields["background"] = background
    payload = {name: value for name, value in fields.items() if value is not None}
    return wire.decode_command_request(msgspec.json.encode(payload))


def invalidate_request(
    prefix: str | None, glob: str | None, scope: str | None = None
) -> wire.InvalidateRequest:
    """A ``POST /api/cache/invalidate`` body, checked as the server checks it."""
    given = (("prefix", prefix), ("glob", glob), ("scope", scope))
    payload = {name: value for name, value in given if value is not None}
    return wire.decode_invalidate_request(msgspec.json.encode(payload))
