"""The HTTP answers runcache sends: JSON bytes, a stored result without a copy, an error.

Every answer is JSON with ``Content-Type: application/json``; every error is
``{"error": "..."}`` with the status and headers its :class:`RuncacheError`
carries, so one function answers them all.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runcache import wire
from runcache.errors import RuncacheError

JSON = "application/json"

#: Results at least this large go out in pieces sliced from the cached bytes.
STREAM_THRESHOLD = 256 * 1024

#: How much of a large result each ``http.response.body`` message carries.
CHUNK_BYTES = 256 * 1024


class JSONBytes(Response):
    """JSON already encoded: no encoder call on the way out."""

    media_type = JSON


def json_answer(shape: msgspec.Struct, status: int = 200) -> JSONBytes:
    """A declared shape of :mod:`runcache.wire`, encoded."""
    return JSONBytes(wire.encode(shape), status)


def error_answer(error: RuncacheError) -> JSONBytes:
    """The one error shape (or the body the error carries), with its status and headers."""
    body = error.answer()
    if body is None:
        body = wire.Error(error.message)
    return JSONBytes(wire.encode(body), error.status, dict(error.headers))


class ResultResponse(Response):
    """A stored result with its answer's flags, sent without joining them into one copy.

    ``body`` is the stored JSON object; ``tail`` replaces its closing brace.
    A result of many megabytes goes out in slices of the cached bytes.
    """

    media_type = JSON

    def __init__(self, body: bytes, tail: bytes) -> None:
        self._stored = body
        self._tail = tail
        super().__init__(None, 200)
        self.headers["content-length"] = str(len(body) - 1 + len(tail))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        head = memoryview(self._stored)[:-1]
        for start in range(0, len(head), CHUNK_BYTES):
            piece = bytes(head[start : start + CHUNK_BYTES])
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": self._tail, "more_body": False})
