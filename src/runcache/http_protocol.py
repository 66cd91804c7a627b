"""uvicorn's HTTP/1.1 protocol with the deadlines it lacks, and malformed requests as JSON.

uvicorn closes a keep-alive connection that idles between requests, but sets no
deadline on a connection that never sends a request, nor on headers or a body
that trickle in a byte at a time: each such connection would stay open for good.
Here every request has ``header_timeout`` seconds from its first byte (or from
the connection's start) to send its headers, and ``body_timeout`` seconds more
to send its body; a connection that misses either is closed. A request the
parser refuses (a bad chunk size, conflicting lengths) gets a 400 in runcache's
one JSON error shape.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runcache import wire


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines; see the module docstring."""

    header_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeouts(cls, header_timeout: float, body_timeout: float) -> type[GuardedHttpProtocol]:
        """A protocol class with these deadlines, for uvicorn's ``http`` setting."""
        attributes = {"header_timeout": header_timeout, "body_timeout": body_timeout}
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        body = wire.encode(wire.Error(f"malformed HTTP request: {msg}"))
        self.transport.write(b"".join([
            b"HTTP/1.1 400 Bad Request\r\n",
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]))
        self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
