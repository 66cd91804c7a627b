"""The default store: an ordered dict in this process, nothing to install."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from runcache.stores.base import CacheStats

#: A key's value and the clock reading after which it is expired.
_Entry = tuple[bytes, float]

#: The token :meth:`MemoryStore.acquire` grants: there is no lock to hold.
LOCAL_TOKEN = "local"


class MemoryStore:
    """A least-recently-used cache bounded by entries and bytes, guarded by one lock.

    Every method takes the lock once and does all of its work under it, so the
    counts and the entries always agree and :meth:`clear` is a single step. The
    clock is a constructor argument so tests can move time without sleeping.
    """

    description = "memory://"
    #: Every call only takes a lock held for a few dict operations.
    blocking = False

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._coalesced = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            if entry[1] <= self._clock():
                self._remove(key, entry)
                self._expirations += 1
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    async def get_async(self, key: str) -> bytes | None:
        return self.get(key)

    def put(self, key: str, value: bytes, ttl: float, epoch: int) -> bool:
        size = len(value)
        with self._lock:
            if epoch != self._epoch or size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._entries[key] = (value, self._clock() + ttl)
            self._bytes += size
            self._shrink_to_bounds()
            return True

    def _shrink_to_bounds(self) -> None:
        # The least recently used entry goes first; if it had already expired,
        # that is an expiration, not an eviction.
        now = self._clock()
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            key, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry[0])
            if entry[1] <= now:
                self._expirations += 1
            else:
                self._evictions += 1

    def _remove(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= len(entry[0])

    def epoch(self) -> int:
        return self._epoch

    def peek(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= self._clock():
                return None
            return entry[0]

    def acquire(self, key: str, lease: float) -> str | None:
        """Always granted: no other process shares this store."""
        return LOCAL_TOKEN

    def release(self, key: str, token: str) -> None:
        """Nothing to release: :meth:`acquire` took no lock."""

    def record_coalesced(self) -> None:
        with self._lock:
            self._coalesced += 1

    def clear(self) -> CacheStats:
        with self._lock:
            before = self._snapshot()
            self._entries.clear()
            self._bytes = 0
            self._epoch += 1
            self._reset_counts()
            return before

    def stats(self) -> CacheStats:
        with self._lock:
            self._purge_expired()
            return self._snapshot()

    def _purge_expired(self) -> None:
        # So that ``size`` and ``bytes`` count only entries that could be served.
        now = self._clock()
        expired = [(key, entry) for key, entry in self._entries.items() if entry[1] <= now]
        for key, entry in expired:
            self._remove(key, entry)
        self._expirations += len(expired)

    def _snapshot(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            coalesced=self._coalesced,
            size=len(self._entries),
            max_size=self.max_entries,
            bytes=self._bytes,
            max_bytes=self.max_bytes,
        )

    def close(self) -> None:
        """Nothing to release: the entries go with the process."""

    async def aclose(self) -> None:
        """Nothing to release."""
