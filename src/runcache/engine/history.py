"""The cache's hits and misses over time, kept by the server.

A dashboard opened now draws the hit rate of the last hour, not only of the
minutes it has been open: while the app serves, :meth:`History.recording` reads
the cache's statistics every :data:`INTERVAL_SECONDS` and keeps the last
:data:`SAMPLES` readings in a ring, so the memory it takes is fixed. Each sample
holds the counts since the last clear, as ``GET /api/cache/stats`` answers them;
a reader works out the rate of any stretch from two of them. With ``--workers``
each process keeps its own ring of the store they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from runcache import wire

#: How often the statistics are read: often enough for a chart, and a store read
#: every few seconds costs nothing a server notices.
INTERVAL_SECONDS = 5.0

#: The samples kept: an hour's at the interval above.
SAMPLES = 720

log = logging.getLogger(__name__)


class History:
    """The last ``size`` samples of the cache's counts, one every ``interval`` seconds."""

    def __init__(
        self,
        interval: float = INTERVAL_SECONDS,
        size: int = SAMPLES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._samples: deque[wire.HitSample] = deque(maxlen=size)

    def record(self, stats: wire.CacheStats) -> None:
        """Keep ``stats``' counts as of now, dropping the oldest sample when full."""
        self._samples.append(wire.HitSample(round(self._clock(), 3), stats.hits, stats.misses))

    def answer(self) -> wire.CacheHistory:
        """The samples kept, oldest first: the answer of ``GET /api/cache/history``."""
        return wire.CacheHistory(interval=self.interval, samples=list(self._samples))

    @contextlib.asynccontextmanager
    async def recording(
        self, read: Callable[[], Awaitable[wire.CacheStats]]
    ) -> AsyncIterator[None]:
        """Record what ``read`` answers now and every interval, while the block runs."""
        task = asyncio.ensure_future(self._keep(read))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep(self, read: Callable[[], Awaitable[wire.CacheStats]]) -> None:
        while True:
            try:
                self.record(await read())
            except Exception:  # a sample lost is no reason to stop keeping the others
                log.exception("could not read the cache statistics for their history")
            await asyncio.sleep(self.interval)
