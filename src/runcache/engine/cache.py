"""The cache as the engine sees it: a store, its statistics, and what happens when it fails.

Each store keeps the cache's rules itself (bounds, least recently used first,
expiry, counts), because for SQLite and Redis those rules must hold across
processes. What lives here is what every store shares: the statistics record
and :class:`Cache`, which stands between the engine and a store so that a
failing store degrades runcache to running commands uncached instead of failing
requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from runcache.errors import StoreError
from runcache.stores.base import CacheStats, CommandMatch, EntryInfo, Store

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds a failed store is left alone before it is tried again, so that an
#: unreachable store does not add a connect timeout to every request.
RETRY_INTERVAL = 1.0

#: Seconds a cross-instance lock outlives the run it guards, for killing a
#: timed-out command and storing its result.
LEASE_MARGIN = 10.0

#: Threads that call a store which blocks (SQLite, Redis), for all but hits
#: (stores, clears, statistics, locks): rare next to hits, and a few threads
#: keep the event loop free of them without threads that would only fight
#: over the GIL.
STORE_THREADS = 4

#: First and longest pause between looks for a result another instance is making.
POLL_FIRST = 0.01
POLL_LONGEST = 0.25


def _ignore() -> None:
    pass


class _Rested(StoreError):
    """A call to the store not made, as the store failed while the call waited for a thread."""


class Cache:
    """A store plus fault tolerance: store errors become misses, logged once per outage.

    Every operation is a coroutine. A store that answers from memory is called
    on the event loop, so a hit costs no thread hop; a store that may block on
    disk or network (``store.blocking``) is called in one of a few threads.

    While the store is failing, :attr:`degraded_reason` says why, and calls skip
    the store for ``retry_interval`` seconds after each failure; the first call that
    succeeds again clears the reason and logs the recovery.
    """

    def __init__(self, store: Store, retry_interval: float = RETRY_INTERVAL) -> None:
        self.store = store
        self.retry_interval = retry_interval
        self._fault_lock = threading.Lock()
        self._degraded_reason: str | None = None
        self._retry_at = 0.0
        self._threads: ThreadPoolExecutor | None = None
        #: Called once for each call to the store that failed (the metrics count them).
        self.on_failure: Callable[[], None] = _ignore
        if store.blocking:
            self._threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="runcache-store")

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded_reason

    async def lookup(self, key: str, stale: float = 0.0) -> tuple[bytes, bool] | None:
        """The value of ``key`` and whether it is stale, accepting it up to ``stale``
        seconds past its expiry (0: live only), or None.

        With ``stale`` 0, the hit path: the store's ``get_async``, on the loop whatever
        ``blocking`` says. A stale lookup is not the hot path: a blocking store's call
        is made in a thread.
        """
        if stale > 0:
            return await self._attempt(None, lambda: self.store.get_stale(key, stale))
        if self._resting():
            return None
        try:
            found = await self.store.get_async(key)
        except StoreError as error:
            self._failed(error)
            return None
        self._succeeded()
        return None if found is None else (found, False)

    async def put(
        self,
        key: str,
        value: bytes,
        ttl: float,
        epoch: int | None,
        command: str = "",
        return_code: int = 0,
        scope: str = "",
    ) -> bool:
        """Store a result unless the store is down or was cleared since ``epoch`` was read."""
        if epoch is None:
            return False
        return await self._attempt(
            False, lambda: self.store.put(key, value, ttl, epoch, command, return_code, scope)
        )

    async def epoch(self) -> int | None:
        """The store's clear counter, or None when the store cannot be reached."""
        return await self._attempt(None, lambda: self.store.epoch())

    async def record_coalesced(self) -> None:
        await self._attempt(None, lambda: self.store.record_coalesced())

    async def clear(self) -> CacheStats:
        """Empty the store and reset its counts; raises StoreError if the store is down."""
        return await self._insist(lambda: self.store.clear())

    async def stats(self) -> CacheStats:
        """The store's statistics; raises StoreError if the store is down."""
        return await self._insist(lambda: self.store.stats())

    # What operators do to entries: each raises StoreError while the store is down.

    async def entries(
        self, prefix: str, offset: int, limit: int, scope: str | None = None
    ) -> list[EntryInfo]:
        return await self._insist(lambda: self.store.entries(prefix, offset, limit, scope))

    async def entry(self, key: str) -> tuple[EntryInfo, bytes] | None:
        return await self._insist(lambda: self.store.entry(key))

    async def delete(self, key: str) -> bool:
        return await self._insist(lambda: self.store.delete(key))

    async def delete_matching(self, match: CommandMatch, scope: str | None = None) -> int:
        """Delete what ``match`` accepts (of ``scope`` alone, given one), in a thread on
        every store (the memory store's other calls run on the loop): the request sets
        its cost, a pattern tested against every command in the cache."""
        if self._threads is None:
            return await asyncio.to_thread(self.store.delete_matching, match, scope)
        return await self._insist(lambda: self.store.delete_matching(match, scope))

    async def _call(self, operation: Callable[[], T]) -> T:
        """``operation()``: here when the store answers from memory, else in a thread.

        Each caller passes its store call as a ``lambda``, so the call reads (and an
        editor finds it) as what it is: ``self.store.put(key, ...)``."""
        if self._threads is None:
            return operation()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads, functools.partial(self._unless_resting, operation)
        )

    def _unless_resting(self, operation: Callable[[], T]) -> T:
        """In a store thread: ``operation()``, unless the store failed while it waited.

        With the store hanging, every thread waits out the store's timeout; a call
        queued behind them would wait for theirs, then for its own. Not made, it
        costs its request no more than the one timeout that rested the store.
        """
        reason = self._degraded_reason
        if reason is not None and time.monotonic() < self._retry_at:
            raise _Rested(reason)
        try:
            return operation()
        except StoreError as error:
            self._failed(error)  # now, before this thread takes the next queued call
            raise

    async def _attempt(self, fallback: T, operation: Callable[[], T]) -> T:
        """``operation()``, or ``fallback`` while the store is failing or resting."""
        if self._resting():
            return fallback
        try:
            result = await self._call(operation)
        except StoreError as error:
            self._failed(error)
            return fallback
        self._succeeded()
        return result

    async def _insist(self, operation: Callable[[], T]) -> T:
        """``operation()``, raising StoreError while the store is failing or resting."""
        self._raise_if_resting()
        try:
            result = await self._call(operation)
        except StoreError as error:
            self._failed(error)
            raise
        self._succeeded()
        return result

    @asynccontextmanager
    async def exclusive(
        self,
        key: str,
        run_timeout: float,
        superseded: bytes | None = None,
        on_lock: Callable[[str], None] | None = None,
    ) -> AsyncIterator[bytes | None]:
        """Let one instance at a time run ``key``'s command.

        Yields None to the caller that should run the command (holding the
        store's lock for ``key`` meanwhile), or the result that another instance
        stored while this one waited; a refresh names the result it replaces as
        ``superseded``, which never counts as found. The lock lapses on its own,
        so a crashed holder delays the others by at most ``run_timeout`` plus a
        margin; a store that fails lets the caller run the command unlocked.
        ``on_lock`` is given the lock's token once taken (the job board keeps it, so
        that a reaper releases this lock, not one taken after it lapsed).
        """
        token, found = await self._claim(key, run_timeout + LEASE_MARGIN, superseded)
        if token is not None and on_lock is not None:
            on_lock(token)
        try:
            yield found
        finally:
            if token is not None:
                await self._release(key, token)

    async def peek(self, key: str) -> bytes | None:
        """The stored result for ``key``, counting neither a hit nor a miss."""
        return await self._attempt(None, lambda: self.store.peek(key))

    async def _claim(
        self, key: str, lease: float, superseded: bytes | None
    ) -> tuple[str | None, bytes | None]:
        """Wait until this instance holds ``key``'s lock or a new result is stored."""
        deadline = time.monotonic() + lease
        pause = POLL_FIRST
        while not self._resting():
            try:
                token, found = await self._call(lambda: self._try_claim(key, lease))
            except StoreError as error:
                self._failed(error)
                break
            if found is not None and found != superseded:
                if token is not None:
                    await self._release(key, token)
                return None, found
            if token is not None:
                return token, None
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_LONGEST)
        return None, None

    def _try_claim(self, key: str, lease: float) -> tuple[str | None, bytes | None]:
        token = self.store.acquire(key, lease)
        # Looked for after taking the lock too: another holder may have
        # stored the result and let go since this caller's miss.
        return token, self.store.peek(key)

    async def _release(self, key: str, token: str) -> None:
        try:
            await self._call(lambda: self.store.release(key, token))
        except StoreError as error:
            self._failed(error)

    async def aclose(self) -> None:
        """Release what the store opened on the running loop; await it before the loop ends."""
        await self.store.aclose()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        self.store.close()

    def _resting(self) -> bool:
        """Whether the store failed so recently that it is not worth trying yet."""
        return self._degraded_reason is not None and time.monotonic() < self._retry_at

    def _raise_if_resting(self) -> None:
        reason = self._degraded_reason
        if reason is not None and time.monotonic() < self._retry_at:
            raise StoreError(reason)

    def _failed(self, error: StoreError) -> None:
        if isinstance(error, _Rested):  # not a new failure: the rest runs from the last one
            return
        self.on_failure()
        with self._fault_lock:
            first = self._degraded_reason is None
            self._degraded_reason = error.message
            self._retry_at = time.monotonic() + self.retry_interval
        if first:
            log.error("cache store failed, running commands uncached: %s", error.message)

    def _succeeded(self) -> None:
        # Read without the lock first: this runs on every cache hit.
        if self._degraded_reason is None:
            return
        with self._fault_lock:
            recovered = self._degraded_reason is not None
            self._degraded_reason = None
        if recovered:
            log.warning("cache store is reachable again")
