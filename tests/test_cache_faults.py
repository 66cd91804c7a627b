"""What the cache does with a store that hangs: each call waits at most one store timeout.

The store here is a stand-in whose every call hangs for a while and then fails, as a
Redis client does on a stopped Redis when its socket timeout runs out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from runcache.engine.cache import STORE_THREADS, Cache
from runcache.errors import StoreError

HANG = 0.3


class HangingStore:
    """Every call takes ``HANG`` seconds, then fails; it counts the calls made."""

    blocking = True
    description = "hanging://"

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def epoch(self) -> int:
        with self._lock:
            self.calls += 1
        time.sleep(HANG)
        raise StoreError("hanging store: Timeout reading from socket")

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_calls_queued_behind_a_hung_store_are_not_made() -> None:
    """Three times as many calls as store threads: without the check in the thread, the
    last third would wait for two timeouts before their own, three in all."""
    store = HangingStore()
    cache = Cache(store, retry_interval=60)  # type: ignore[arg-type]

    async def many() -> list[Any]:
        return await asyncio.gather(*(cache.epoch() for _ in range(3 * STORE_THREADS)))

    try:
        answers = asyncio.run(many())
    finally:
        cache.close()
    assert answers == [None] * (3 * STORE_THREADS)
    # Had the queued calls been made, each would have hung a timeout of its own: the count
    # says so without timing anything (a busy machine stretches every wait alike).
    assert store.calls == STORE_THREADS, "only the calls under way when it failed were made"
    assert cache.degraded_reason == "hanging store: Timeout reading from socket"
