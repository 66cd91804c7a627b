"""Talking to runcache: over HTTP to a running server, or to an engine in this process.

The CLI's client commands and the MCP adapter both need the same five
operations. :class:`Backend` names them once, with the typed answers of
:mod:`runcache.wire`; :class:`Client` answers them from a server and
:class:`LocalClient` from an :class:`Engine` of its own, so each caller has one
code path whichever way it was started, and HTTP handling lives only here.

HTTP goes through the standard library's ``http.client``: a handful of small
JSON requests per process does not justify a dependency, and holding each
connection lets :meth:`Client.close` cut a request that is still waiting.
Requests go straight to the server, never through an ``http_proxy``.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import urllib.parse
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
import orjson

from runcache import __version__, wire
from runcache.client import sse
from runcache.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    RuncacheError,
    ServerError,
    ServerUnreachable,
    Unauthorized,
)
from runcache.wire import CacheStats, Cleared, CommandResult, Health, Telemetry

if TYPE_CHECKING:  # the engine is imported only when one runs in this process
    from anyio.from_thread import BlockingPortal

    from runcache.engine.engine import Engine
    from runcache.engine.jobs import Job

__all__ = ["Backend", "Client", "LocalClient", "ServerError", "ServerUnreachable", "connect"]

S = TypeVar("S", bound=msgspec.Struct)

#: Environment variables the client reads when no option is given.
URL_ENV = "RUNCACHE_URL"
TOKEN_ENV = "RUNCACHE_TOKEN"
ADMIN_TOKEN_ENV = "RUNCACHE_ADMIN_TOKEN"

#: Seconds to wait for a server's answer to anything but running a command.
REQUEST_TIMEOUT = 30.0

#: Seconds to wait past a command's own timeout, for the server to kill it and answer.
EXECUTE_MARGIN = 60.0

#: The answer to a clear, as the contract fixes it for ``POST /api/cache/clear``.
CLEARED = Cleared()

#: The events that end a job's event stream: its result, or why it never ran.
FINAL_EVENTS = frozenset({"result", "error"})

#: A job event's id: the bytes of stdout and of stderr sent up to and with it.
_EVENT_ID = re.compile(r"^(\d+):(\d+)$")


#: Statuses that map back to the error the server raised, so callers can catch it by name.
_ERRORS_BY_STATUS: dict[int, type[RuncacheError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}


class Backend(Protocol):
    """The operations the CLI and the MCP adapter use, wherever the engine runs."""

    description: str

    def execute(
        self,
        command: str,
        use_cache: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> CommandResult: ...

    def cache_stats(self) -> CacheStats: ...

    def clear(self) -> Cleared: ...

    def health(self) -> Health: ...

    def telemetry(self) -> Telemetry: ...

    def close(self) -> None: ...


_Self = TypeVar("_Self", bound="_Closing")


class _Closing:
    """``with`` support: leaving the block closes the backend."""

    def close(self) -> None:
        """Release what the backend holds."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: The optional request fields passed by name: how stale an answer may be, and the
#: run's context (see :mod:`runcache.run.context`).
OPTIONAL_FIELDS = ("stale", "cwd", "env", "stdin")


def command_request(
    command: str,
    use_cache: bool,
    timeout: float | None,
    ttl: float | None,
    refresh: bool = False,
    background: bool = False,
    **context: Any,
) -> wire.CommandRequest:
    """A ``POST /api/command`` body, checked as the server checks it.

    ``context`` holds the fields of ``OPTIONAL_FIELDS`` (``stale`` and the run
    context: ``cwd``, ``env``, ``stdin``); one left None is left out. Encoded and
    decoded once, so a bad value fails here with the very message the server would
    answer, before anything is sent or run.
    """
    unknown = set(context) - set(OPTIONAL_FIELDS)
    if unknown:
        raise TypeError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    payload: dict[str, Any] = {"command": command, "use_cache": use_cache}
    optional = {"timeout": timeout, "ttl": ttl, **context}
    payload.update((name, value) for name, value in optional.items() if value is not None)
    if refresh:
        payload["refresh"] = True
    if background:
        payload["background"] = True
    return wire.decode_command_request(orjson.dumps(payload))


def invalidate_request(prefix: str | None, glob: str | None) -> wire.InvalidateRequest:
    """A ``POST /api/cache/invalidate`` body, checked as the server checks it."""
    payload = {
        name: value for name, value in (("prefix", prefix), ("glob", glob)) if value is not None
    }
    return wire.decode_invalidate_request(orjson.dumps(payload))


class Client(_Closing):
    """A runcache server over HTTP; every failure is a :class:`RuncacheError` with one line.

    Each request opens its own connection, so one client serves many threads.
    :meth:`close` shuts the connections still waiting, so a caller that is
    shutting down is never held up by a long command on the server.
    """

    def __init__(self, url: str, token: str | None = None, admin_token: str | None = None) -> None:
        self.url = normalize_url(url)
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server URL must look like http://host:port, got {url!r}")
        self._connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._netloc = parts.netloc.rpartition("@")[2]
        self._base_path = parts.path
        self.token = token or None
        self.admin_token = admin_token or None
        self.description = f"runcache server at {self.url}"
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self._closed = False

    def execute(
        self,
        command: str,
        use_cache: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        **context: Any,
    ) -> CommandResult:
        """Run a command on the server; wait as long as the server lets it run.

        ``context`` takes ``stale`` and the run context fields: ``cwd``, ``env``, ``stdin``."""
        wait = None if timeout is None else timeout + EXECUTE_MARGIN
        body = wire.encode(command_request(command, use_cache, timeout, ttl, **context))
        return self._request(CommandResult, "POST", "/api/command", body, wait=wait)

    def cache_stats(self) -> CacheStats:
        return self._request(CacheStats, "GET", "/api/cache/stats")

    def clear(self) -> Cleared:
        """Clear the cache, with the admin token when there is one."""
        return self._request(
            Cleared, "POST", "/api/cache/clear", token=self.admin_token or self.token
        )

    def health(self) -> Health:
        return self._request(Health, "GET", "/health")

    def telemetry(self) -> Telemetry:
        return self._request(Telemetry, "GET", "/api/telemetry")

    # -- jobs ------------------------------------------------------------------------

    def start(
        self,
        command: str,
        use_cache: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        refresh: bool = False,
        **context: Any,
    ) -> wire.JobAccepted:
        """Start (or join) a run in the background: its job, at once (``context`` as for
        :meth:`execute`)."""
        body = wire.encode(
            command_request(command, use_cache, timeout, ttl, refresh, background=True, **context)
        )
        return self._request(wire.JobAccepted, "POST", "/api/command", body)

    def jobs(self) -> wire.JobList:
        return self._request(wire.JobList, "GET", "/api/jobs")

    def job(self, job_id: str) -> wire.JobDetail:
        return self._request(wire.JobDetail, "GET", f"/api/jobs/{_segment(job_id)}")

    def output(
        self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int | None = None
    ) -> wire.JobOutput:
        query = {"stream": stream, "offset": offset}
        if limit is not None:
            query["limit"] = limit
        path = f"/api/jobs/{_segment(job_id)}/output?{urllib.parse.urlencode(query)}"
        return self._request(wire.JobOutput, "GET", path)

    def events(self, job_id: str, last_event_id: str | None = None) -> sse.EventStream:
        """A job's Server-Sent Events as they come: ``stdout`` and ``stderr`` chunks (from
        the start, or after ``last_event_id``), then its ``result`` (or ``error``), then
        the end.

        The server must answer within ``REQUEST_TIMEOUT``; the stream then waits as
        long as the command stays quiet, since the server sends nothing until there is
        something to say. :meth:`close` cuts it, and a stream that ends before its
        result (the server stopped, say) raises :class:`ServerUnreachable`, as a cut
        request does. Closing the generator hangs up.
        """
        headers = self._headers(self.token, json_body=False)
        headers["Accept"] = "text/event-stream"
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        path = f"/api/jobs/{_segment(job_id)}/events"
        connection = self._connection(REQUEST_TIMEOUT)
        ended = False
        try:
            response = self._stream_response(connection, path, headers)
            for event in sse.parse(iter(response.readline, b"")):
                ended = event.kind in FINAL_EVENTS
                yield event
        except (OSError, http.client.HTTPException) as error:
            raise self._cut(self._unreachable(error).message) from None
        finally:
            self._release(connection)
        if not ended:
            raise self._cut(f"the events of job {job_id} stopped before its result")

    def cancel(self, job_id: str) -> wire.JobAction:
        return self._request(wire.JobAction, "POST", f"/api/jobs/{_segment(job_id)}/cancel")

    def leave(self, job_id: str) -> wire.JobAction:
        """Give up a job this client started or joined in the background: the run is
        cancelled if nobody else wants it."""
        return self._request(wire.JobAction, "POST", f"/api/jobs/{_segment(job_id)}/leave")

    def pause(self, job_id: str) -> wire.JobAction:
        return self._request(wire.JobAction, "POST", f"/api/jobs/{_segment(job_id)}/pause")

    def resume(self, job_id: str) -> wire.JobAction:
        return self._request(wire.JobAction, "POST", f"/api/jobs/{_segment(job_id)}/resume")

    # -- cache entries ------------------------------------------------------------------

    def entries(
        self, prefix: str = "", offset: int = 0, limit: int | None = None
    ) -> wire.CacheEntryList:
        query: dict[str, str | int] = {"prefix": prefix, "offset": offset}
        if limit is not None:
            query["limit"] = limit
        path = f"/api/cache/entries?{urllib.parse.urlencode(query)}"
        return self._request(wire.CacheEntryList, "GET", path)

    def invalidate(self, prefix: str | None = None, glob: str | None = None) -> wire.Deleted:
        """Delete the entries whose command starts with ``prefix`` or matches ``glob``,
        with the admin token when there is one."""
        body = wire.encode(invalidate_request(prefix, glob))
        return self._request(
            wire.Deleted,
            "POST",
            "/api/cache/invalidate",
            body,
            token=self.admin_token or self.token,
        )

    # -- the reference's process routes ---------------------------------------------------

    def processes(self) -> wire.ProcessList:
        return self._request(wire.ProcessList, "GET", "/api/processes/list")

    def process_status(self, pid: int) -> wire.ProcessDetail:
        return self._request(wire.ProcessDetail, "GET", f"/api/processes/status/{int(pid)}")

    def terminate_process(self, pid: int) -> wire.ProcessDone:
        return self._request(wire.ProcessDone, "POST", f"/api/processes/terminate/{int(pid)}")

    def pause_process(self, pid: int) -> wire.ProcessDone:
        return self._request(wire.ProcessDone, "POST", f"/api/processes/pause/{int(pid)}")

    def resume_process(self, pid: int) -> wire.ProcessDone:
        return self._request(wire.ProcessDone, "POST", f"/api/processes/resume/{int(pid)}")

    def dashboard(self) -> wire.Dashboard:
        return self._request(wire.Dashboard, "GET", "/api/processes/dashboard")

    def close(self) -> None:
        """Refuse new requests and cut the connections of those still waiting."""
        with self._lock:
            self._closed = True
            waiting = list(self._open)
        for connection in waiting:
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _request(
        self,
        shape: type[S],
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = None,
        wait: float | None = REQUEST_TIMEOUT,
    ) -> S:
        where = self.url + path
        headers = self._headers(token or self.token, json_body=body is not None)
        connection = self._connection(wait)
        try:
            connection.request(method, self._base_path + path, body=body, headers=headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            raise self._unreachable(error) from None
        finally:
            self._release(connection)
        if status >= 400:
            raise _server_error(status, data, where)
        return _decode(shape, data, where)

    def _connection(self, wait: float | None) -> http.client.HTTPConnection:
        """A connection :meth:`close` can cut, with ``wait`` for each step of the request."""
        connection = self._connection_class(self._netloc, timeout=wait)
        with self._lock:
            if self._closed:
                raise ServerUnreachable(f"the client of {self.url} is closed")
            self._open.add(connection)
        return connection

    def _release(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(connection)
        connection.close()

    def _stream_response(
        self, connection: http.client.HTTPConnection, path: str, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        """The answer to a GET of an event stream, whose reads then wait without a limit.

        The check for :meth:`close` comes once the socket exists: a close before it
        found nothing to shut, and one after it shuts this socket, so none is missed.
        """
        where = self.url + path
        connection.request("GET", self._base_path + path, headers=headers)
        response = connection.getresponse()
        if response.status >= 400:
            raise _server_error(response.status, response.read(), where)
        if not (response.getheader("Content-Type") or "").startswith("text/event-stream"):
            raise ServerError(f"{where} did not answer with events; is it a runcache server?", 502)
        with self._lock:
            if self._closed or connection.sock is None:
                raise ServerUnreachable(f"the client of {self.url} is closed")
            connection.sock.settimeout(None)
        return response

    def _cut(self, why: str) -> ServerUnreachable:
        """The error of a stream that ended early: the client's close, or ``why``."""
        with self._lock:
            closed = self._closed
        return ServerUnreachable(f"the client of {self.url} is closed" if closed else why)

    @staticmethod
    def _headers(token: str | None, json_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"runcache/{__version__}"}
        if json_body:
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _unreachable(self, error: Exception) -> ServerUnreachable:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        if isinstance(error, TimeoutError):
            reason = "no answer in time"
        elif not str(reason):
            reason = type(error).__name__
        return ServerUnreachable(f"cannot reach a runcache server at {self.url}: {reason}")


class LocalClient(_Closing):
    """An engine in this process, behind the same interface as :class:`Client`.

    The engine's coroutines run on an event loop of the client's own, in a
    thread, so the calls here block like :class:`Client`'s and may come from
    any thread. Requests are checked by the wire's own decoder, so a bad one
    fails with the very message the API would give.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.description = f"runcache in-process (store {engine.cache.store.description})"
        from anyio.from_thread import start_blocking_portal

        self._loop: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._loop.__enter__()

    @classmethod
    def from_environment(cls) -> LocalClient:
        """An engine with the settings of the environment (``RUNCACHE_STORE`` and the rest)."""
        from runcache.config import Config
        from runcache.engine.engine import Engine

        return cls(Engine.from_config(Config.load()))

    def execute(
        self,
        command: str,
        use_cache: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        **context: Any,
    ) -> CommandResult:
        request = command_request(command, use_cache, timeout, ttl, **context)
        return self._portal.call(self.engine.execute, request, "local").result()

    def cache_stats(self) -> CacheStats:
        return self._portal.call(self.engine.cache_stats)

    def clear(self) -> Cleared:
        return self._portal.call(self.engine.clear)

    def health(self) -> Health:
        return self._portal.call(self.engine.health)

    def telemetry(self) -> Telemetry:
        return self.engine.telemetry.snapshot()

    # -- jobs, as Client has them: what following a run needs ------------------------

    def start(
        self,
        command: str,
        use_cache: bool = True,
        timeout: float | None = None,
        ttl: float | None = None,
        refresh: bool = False,
        **context: Any,
    ) -> wire.JobAccepted:
        request = command_request(
            command, use_cache, timeout, ttl, refresh, background=True, **context
        )
        return self._portal.call(self._start, request)

    async def _start(self, request: wire.CommandRequest) -> wire.JobAccepted:
        from runcache.engine import job_answers

        return await job_answers.accepted(await self.engine.submit(request, "local"))

    def job(self, job_id: str) -> wire.JobDetail:
        from runcache.engine import job_answers

        return self._portal.call(lambda: job_answers.detail(self.engine.jobs.get(job_id)))

    def output(
        self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int | None = None
    ) -> wire.JobOutput:
        from runcache.engine import job_answers

        size = job_answers.DEFAULT_PAGE_BYTES if limit is None else limit
        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        return self._portal.call(job_answers.page, job, stream, offset, size)

    def events(self, job_id: str, last_event_id: str | None = None) -> sse.EventStream:
        """The job's events as :meth:`Client.events` gives them, read from the engine's job
        on this client's loop one at a time (the data keeps carriage returns here: no
        wire format forces lines)."""
        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        positions = _positions(last_event_id)
        while True:
            event = self._portal.call(_next_event, job, positions)
            yield event
            if event.kind in FINAL_EVENTS:
                return

    def leave(self, job_id: str) -> wire.JobAction:
        from runcache.engine import job_answers

        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        return self._portal.call(job_answers.leave, self.engine, job)

    def entries(
        self, prefix: str = "", offset: int = 0, limit: int | None = None
    ) -> wire.CacheEntryList:
        from runcache.engine import entry_answers

        size = entry_answers.DEFAULT_LIST if limit is None else limit
        return self._portal.call(entry_answers.listing, self.engine, prefix, offset, size)

    def invalidate(self, prefix: str | None = None, glob: str | None = None) -> wire.Deleted:
        from runcache.engine import entry_answers

        request = invalidate_request(prefix, glob)
        return self._portal.call(entry_answers.invalidate, self.engine, request, "local")

    def close(self) -> None:
        """Kill commands still running, stop the client's loop, and release the store."""
        self.engine.runner.kill_all()
        self._portal.call(self.engine.aclose)
        self._loop.__exit__(None, None, None)
        self.engine.close()


def connect(
    url: str | None, token: str | None = None, admin_token: str | None = None
) -> Client | LocalClient:
    """A client for the server at ``url``, or an engine in this process when there is none."""
    if url:
        return Client(url, token, admin_token)
    return LocalClient.from_environment()


def normalize_url(url: str) -> str:
    """``host:port`` or a full URL, as the base URL every path is appended to."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _positions(last_event_id: str | None) -> dict[str, int]:
    """Where a reader resumes: after the id of the last event it read, as the API reads
    ``Last-Event-ID``."""
    if last_event_id is None or not last_event_id.strip():
        return {"stdout": 0, "stderr": 0}
    match = _EVENT_ID.match(last_event_id.strip())
    if match is None:
        raise BadRequest(
            "Last-Event-ID must be <stdout offset>:<stderr offset>, as the events of this job carry"
        )
    return {"stdout": int(match[1]), "stderr": int(match[2])}


async def _next_event(job: Job, positions: dict[str, int]) -> sse.Event:
    """The next event of ``job`` for a reader at ``positions`` (moved past it): new output
    on either stream, else the result once the job has ended, else wait for a change.

    The API's event stream does the same for many readers at once, written as
    bytes; one reader in process takes one event per call through the portal. The
    reader counts as a follower while it waits, so the run's thread wakes it on new
    output; output that came before is seen by its length, so none is missed.
    """
    from runcache.engine import job_answers

    job.followers += 1
    try:
        while True:
            ended = job.ended
            for name in job_answers.STREAMS:
                if not (ended or job_answers.may_have_more(job, name, positions[name])):
                    continue
                data, next_offset, _, _ = await job_answers.read_stream(
                    job, name, positions[name], job_answers.EVENT_BYTES
                )
                if next_offset != positions[name]:
                    positions[name] = next_offset
                    event_id = f"{positions['stdout']}:{positions['stderr']}"
                    return sse.Event(name, data.decode("utf-8", "replace"), event_id)
            if ended:
                body = job_answers.result_json(job)
                if body is None:
                    return sse.Event("error", wire.encode(wire.Error(job.error or "")).decode())
                return sse.Event("result", body.decode())
            await job.changed()
    finally:
        job.followers -= 1


def _segment(text: str) -> str:
    """``text`` as one path segment: a job id with a slash cannot reach another route."""
    return urllib.parse.quote(text, safe="")


def _decode(shape: type[S], body: bytes, where: str) -> S:
    try:
        return msgspec.json.decode(body, type=shape)
    except msgspec.ValidationError as error:
        message = f"{where} answered JSON that is not a runcache {shape.__name__}: {error}"
        raise ServerError(message, 502) from None
    except msgspec.DecodeError:
        message = f"{where} did not answer with JSON; is it a runcache server?"
        raise ServerError(message, 502) from None


def _server_error(status: int, body: bytes, where: str) -> RuncacheError:
    """The server's own message when it sent one, with the error class its status names."""
    try:
        message = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    if not isinstance(message, str):
        message = f"{where} answered HTTP {status}"
    error_class = _ERRORS_BY_STATUS.get(status)
    if error_class is not None:
        return error_class(message)
    return ServerError(message, status)
