"""Talking to a running runcache server over HTTP: :class:`Client`.

The operations and their checks are :class:`~runcache.client.base.BaseClient`'s,
shared with the in-process :class:`~runcache.client.local.LocalClient`; this module
carries them over HTTP, and HTTP handling lives only here.

HTTP goes through the standard library's ``http.client``: a handful of small
JSON requests per process does not justify a dependency, and importing httpx (or
httpx2) would cost ``runcache run`` against a server 1.4 to 1.7 times its CPU,
which its one request cannot win back (``benchmarks/remote_run_startup.py``).
Holding each connection lets :meth:`Client.close` cut a request still waiting.
Requests go straight to the server, never through an ``http_proxy``.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import urllib.parse
from typing import TypeVar

import msgspec

from runcache import __version__, wire
from runcache.client import sse
from runcache.client.base import FINAL_EVENTS, BaseClient, unique_prefix
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

__all__ = ["Client", "ServerError", "ServerUnreachable", "normalize_url"]

S = TypeVar("S", bound=msgspec.Struct)

#: Environment variables the client reads when no option is given.
URL_ENV = "RUNCACHE_URL"
TOKEN_ENV = "RUNCACHE_TOKEN"
ADMIN_TOKEN_ENV = "RUNCACHE_ADMIN_TOKEN"

#: Seconds to wait for a server's answer to anything but running a command.
REQUEST_TIMEOUT = 30.0

#: Seconds to wait past a command's own timeout, for the server to kill it and answer.
EXECUTE_MARGIN = 60.0

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


class Client(BaseClient):
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

    def _execute(self, request: wire.CommandRequest) -> CommandResult:
        wait = None if request.timeout is None else request.timeout + EXECUTE_MARGIN
        return self._request(CommandResult, "POST", "/api/command", wire.encode(request), wait=wait)

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

    def _start(self, request: wire.CommandRequest) -> wire.JobAccepted:
        return self._request(wire.JobAccepted, "POST", "/api/command", wire.encode(request))

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
        self, prefix: str = "", offset: int = 0, limit: int | None = None, scope: str | None = None
    ) -> wire.CacheEntryList:
        query: dict[str, str | int] = {"prefix": prefix, "offset": offset}
        if limit is not None:
            query["limit"] = limit
        if scope is not None:
            query["scope"] = scope
        path = f"/api/cache/entries?{urllib.parse.urlencode(query)}"
        return self._request(wire.CacheEntryList, "GET", path)

    def entry(self, key: str) -> wire.CacheEntryDetail:
        return self._request(wire.CacheEntryDetail, "GET", f"/api/cache/entries/{_segment(key)}")

    def delete_entry(self, key: str) -> wire.Deleted:
        """Delete one entry, with the admin token when there is one."""
        return self._request(
            wire.Deleted,
            "DELETE",
            f"/api/cache/entries/{_segment(key)}",
            token=self.admin_token or self.token,
        )

    def job_id(self, given: str) -> str:
        """The whole id of this client's job ``given`` is a unique prefix of (at least
        ``MIN_PREFIX`` characters), by listing the jobs; else ``given`` as it is."""
        return unique_prefix(given, (job.job_id for job in self.jobs().jobs), "job")

    def _invalidate(self, request: wire.InvalidateRequest) -> wire.Deleted:
        return self._request(
            wire.Deleted,
            "POST",
            "/api/cache/invalidate",
            wire.encode(request),
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


def normalize_url(url: str) -> str:
    """``host:port`` or a full URL, as the base URL every path is appended to."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


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
        message = msgspec.json.decode(body).get("error")
    except (msgspec.DecodeError, AttributeError):
        message = None
    if not isinstance(message, str):
        message = f"{where} answered HTTP {status}"
    error_class = _ERRORS_BY_STATUS.get(status)
    if error_class is not None:
        return error_class(message)
    return ServerError(message, status)
