"""The HTTP API: a Flask blueprint over the engine, and the one JSON error shape."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

from runcache.auth import admin_only
from runcache.errors import BadRequest, Busy, RuncacheError, Unauthorized
from runcache.service import CommandRequest, Engine

log = logging.getLogger(__name__)

api = Blueprint("api", __name__)

#: Results at least this large are streamed from the cached bytes instead of copied.
STREAM_THRESHOLD = 256 * 1024

#: The body of ``POST /api/cache/clear``, fixed to the letter by the user's specification.
CLEAR_BODY = orjson.dumps({"success": True, "message": "Cache cleared"})


class ResultReader:
    """A stored result with its answer's flags, read as one seekable file without a copy.

    The stored JSON object's closing brace is replaced by ``tail``; waitress
    reads the file in blocks with ``read``, ``seek`` and ``tell``.
    """

    def __init__(self, body: bytes, tail: bytes) -> None:
        self._head = memoryview(body)[:-1]
        self._tail = tail
        self._position = 0
        self.size = len(self._head) + len(tail)

    def read(self, size: int = -1) -> bytes:
        start = self._position
        end = self.size if size < 0 else min(self.size, start + size)
        split = len(self._head)
        pieces: list[bytes | memoryview] = []
        if start < split:
            pieces.append(self._head[start : min(end, split)])
        if end > split:
            pieces.append(self._tail[max(start - split, 0) : end - split])
        self._position = max(start, end)
        return b"".join(pieces)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self.size)[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the bytes belong to the cache."""


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON response encoded with orjson (several times faster than the json module)."""
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


def engine() -> Engine:
    """The engine of the app serving this request."""
    found: Engine = current_app.extensions["runcache"]
    return found


def _client() -> str:
    return request.remote_addr or "-"


@api.post("/api/command")
def run_command() -> Response:
    body = request.get_data(cache=False)
    if not body.strip():
        raise BadRequest("Command parameter is required")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"request body must be valid JSON: {error}") from None
    outcome = engine().execute(CommandRequest.from_json(payload), client=_client())
    if len(outcome.body) < STREAM_THRESHOLD:
        return Response(outcome.to_json(), mimetype="application/json")
    # A large result goes out as a file, read in blocks straight from the cached
    # bytes: no copy of the whole body, and waitress does not buffer it again.
    reader = ResultReader(outcome.body, outcome.tail)
    response = Response(
        wrap_file(request.environ, reader),  # type: ignore[arg-type]
        mimetype="application/json", direct_passthrough=True
    )
    response.content_length = reader.size
    return response


@api.get("/api/cache/stats")
def cache_stats() -> Response:
    return json_response(engine().cache_stats())


@api.post("/api/cache/clear")
@admin_only
def clear_cache() -> Response:
    engine().clear()
    return Response(CLEAR_BODY, mimetype="application/json")


@api.get("/api/telemetry")
def telemetry() -> Response:
    return json_response(engine().telemetry.as_dict())


@api.get("/health")
def health() -> Response:
    return json_response(engine().health())


@api.get("/livez")
def livez() -> Response:
    """Liveness for load balancers: answers without touching the store or the machine."""
    return Response(b'{"status":"ok"}', mimetype="application/json")


def register_error_handlers(app: Flask) -> None:
    """Every error leaves as ``{"error": "..."}`` with its status: no HTML, no traceback."""

    @app.errorhandler(RuncacheError)
    def _runcache_error(error: RuncacheError) -> Response:
        response = json_response({"error": error.message}, error.status)
        if isinstance(error, Busy):
            response.headers["Retry-After"] = str(error.retry_after)
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="runcache"'
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        response = json_response({"error": _http_message(status, error)}, status)
        allowed = getattr(error, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_response({"error": "internal error; see the server log"}, 500)


def _http_message(status: int, error: HTTPException) -> str:
    if status == 404:
        return f"no endpoint at {request.path}; see the README for the API"
    if status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if status == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return f"request body is larger than the limit of {limit} bytes"
    return error.description or error.name
