"""uvicorn's HTTP/1.1 protocol with the deadlines and bounds it lacks, and malformed
requests as JSON.

uvicorn closes a keep-alive connection that idles between requests, but sets no
deadline on a connection that never sends a request, nor on headers or a body
that trickle in a byte at a time: each such connection would stay open for good.
Here every request has ``header_timeout`` seconds from its first byte (or from
the connection's start) to send its headers, and ``body_timeout`` seconds more
to send its body; a connection that misses either is closed.

Nor does uvicorn bound a request's headers in bytes: it keeps them all until
they end, so a client sending endless headers held as much memory as it sent,
before any token was checked. Here a request whose request line and headers pass
``max_header_bytes`` gets a 431 and the connection is closed.

Nor does it bound how long an answer may wait on a client that takes nothing:
a stream to a reader that never reads waited for good, holding its connection.
Here a connection whose written bytes stay unsent (the transport's buffer past
its high-water mark, the kernel's full) for ``write_timeout`` seconds is
dropped, its unsent bytes with it.

A request the parser refuses (a bad chunk size, conflicting lengths) gets a 400
in runcache's one JSON error shape.

uvicorn's public settings do not give this: ``timeout_keep_alive`` covers only the
idle time between requests, ``limit_concurrency`` counts connections (a slow one
holds its place), and ``h11_max_incomplete_event_size`` bounds headers only with
the h11 parser and sets no deadline. So this subclasses uvicorn's internal
``HttpToolsProtocol``, whose hooks may change in any release: it was checked
against the versions :data:`CHECKED_UVICORN` names (pyproject.toml's bound
follows it), and tests/test_protocol.py fails on a uvicorn outside them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runcache import wire

#: The first and last uvicorn releases whose ``HttpToolsProtocol`` this was checked
#: against: the methods overridden here, with the same signatures, called as here.
CHECKED_UVICORN = ("0.34.0", "0.55.0")


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines; see the module docstring."""

    header_timeout = 10.0
    body_timeout = 30.0
    write_timeout = 30.0
    max_header_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        # Bytes received of the current request's line and headers; None once they are in.
        self._header_bytes: int | None = 0

    @classmethod
    def configured(
        cls,
        *,
        header_timeout: float,
        body_timeout: float,
        write_timeout: float,
        max_header_bytes: int,
    ) -> type[GuardedHttpProtocol]:
        """A protocol class with these deadlines and bound, for uvicorn's ``http`` setting."""
        attributes = {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "write_timeout": write_timeout,
            "max_header_bytes": max_header_bytes,
        }
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_write()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, but never more than ``max_header_bytes`` of a request's head.

        Only what is left of the bound is fed while the head is incomplete: a
        chunk holding the end of the headers and a body is fed in two, so a body
        never counts as headers. (Bytes of a next, pipelined request that arrive
        with the previous request's body are not counted: at most one read more.)
        """
        while data and not self.transport.is_closing():
            if self._header_bytes is None:
                super().data_received(data)
                return
            room = self.max_header_bytes - self._header_bytes
            if room <= 0:
                self._refuse_large_headers()
                return
            piece, data = data[:room], data[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._header_bytes = None
        self._disarm()
        super().on_headers_complete()
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        self._header_bytes = 0  # what follows is the next request's head
        self._disarm()
        super().on_message_complete()

    def pause_writing(self) -> None:
        """The transport holds more unsent bytes than its high-water mark: the client
        has this long to take some (each resume gives it the whole deadline again)."""
        super().pause_writing()
        self._disarm_write()
        self._write_deadline = self.loop.call_later(self.write_timeout, self._drop)

    def resume_writing(self) -> None:
        self._disarm_write()
        super().resume_writing()

    def send_400_response(self, msg: str) -> None:
        self._refuse(b"400 Bad Request", f"malformed HTTP request: {msg}")

    def _refuse_large_headers(self) -> None:
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"request headers larger than {self.max_header_bytes} bytes (--max-header-bytes)",
        )

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer a request the app never sees, in the one JSON error shape, and close."""
        body = wire.encode(wire.Error(message))
        self.transport.write(
            b"".join(
                [
                    b"HTTP/1.1 %s\r\n" % status,
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _drop(self) -> None:
        """The client took nothing for ``write_timeout``: close at once, unsent bytes and
        all (a plain close would wait for them to be sent, which is to say for good)."""
        self._write_deadline = None
        self.transport.abort()

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
