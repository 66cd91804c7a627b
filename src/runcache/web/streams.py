"""Event streams: how many may be open at once, and an answer that shares the event loop.

A stream (a job's ``/events``, MCP's ``GET /mcp``) holds its connection for as
long as its reader stays, which a reader decides. Under ``--max-connections``,
enough of them would leave no connection for anything else: 99 readers that
never read held every connection of a server allowing 100, for good. So at most
``max_streams`` are open at once (half of ``--max-connections`` unless set), and
a stream past that gets a 503 with Retry-After: the other connections stay for
ordinary requests. (A reader that takes nothing is dropped after
``--write-timeout`` by :mod:`runcache.web.protocol`.)

A stream of a job that has ended has all its events at hand, and a write that
the transport takes does not wait: written in one go, a reader's 16 MB held the
loop, and 200 readers hanging up together blocked ``/livez`` for 23 s, because
a stream whose reader is gone sees it only when it next waits. So
:class:`EventStreamResponse` yields to the loop before each chunk (at most an
event of each output stream), where a reader that has hung up ends it. And the
streams of a process send at most ``PACE_BYTES`` together in each
``PACE_SECONDS``, waiting for the next window past that: 140 readers starting at
once each wrote several megabytes before their kernel buffers filled, a chunk
each per turn of the loop, and uvloop accepts one connection a turn, so a new
client queued behind them waited 6 to 12 s. While the streams wait, the loop
turns freely and accepts. (25 MB/s in all is far more than commands print.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runcache.config import Config
from runcache.errors import Busy

#: What a refused stream's 503 tells its reader to wait: streams last long, so a
#: place frees up less often than a command slot does.
RETRY_AFTER_SECONDS = 5

#: The pace of all streams together: at most PACE_BYTES in each PACE_SECONDS.
PACE_SECONDS = 0.01
PACE_BYTES = 256 * 1024


class StreamsFull(Busy):
    """Every place for a stream is taken. The connection is closed with the answer, so
    that a refused reader, kept alive, does not take the place it left free."""

    @property
    def headers(self) -> Mapping[str, str]:
        return {**super().headers, "Connection": "close"}


class StreamSlots:
    """At most ``size`` streams open at once, counted on the event loop's thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.open = 0
        self._window_end = 0.0
        self._window_bytes = 0

    @classmethod
    def for_config(cls, config: Config) -> StreamSlots:
        """``--max-streams``, or half of ``--max-connections`` when it is 0."""
        return cls(config.max_streams or max(1, config.max_connections // 2))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a place for the block; StreamsFull (a 503 with Retry-After) when none is free."""
        if self.open >= self.size:
            raise StreamsFull(
                f"{self.open} event streams are open, the most this server serves at"
                " once (--max-streams); retry later",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    async def turn(self) -> None:
        """Yield to the loop; then wait, a window at a time, while the streams have sent
        their PACE_BYTES of this window."""
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now >= self._window_end:
                self._window_end, self._window_bytes = now + PACE_SECONDS, 0
            if self._window_bytes < PACE_BYTES:
                return
            await asyncio.sleep(self._window_end - now)

    def sent(self, size: int) -> None:
        """Count ``size`` bytes a stream has just sent against this window."""
        self._window_bytes += size


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` answer that holds one of ``slots`` while it is sent and
    yields to the loop between chunks; see the module docstring."""

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        slots: StreamSlots,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._slots.hold():
            await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            while True:
                await self._slots.turn()  # where a reader's hang-up cancels this stream
                chunk = await anext(self._events, None)
                if chunk is None:
                    break
                self._slots.sent(len(chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # its clean-up now, not when it is collected
