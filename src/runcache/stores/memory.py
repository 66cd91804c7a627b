"""The default store: an ordered dict in this process, nothing to install."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from runcache.stores.base import CacheStats, CommandMatch, EntryInfo, answers, is_stale


class _Entry:
    """A key's value, the clock reading after which it is expired, and what lists it."""

    __slots__ = (
        "value",
        "expires_at",
        "command",
        "created_at",
        "return_code",
        "hits",
        "order",
        "scope",
    )

    def __init__(
        self,
        value: bytes,
        expires_at: float,
        command: str,
        created_at: float,
        return_code: int,
        order: int,
        scope: str,
    ) -> None:
        self.value = value
        self.expires_at = expires_at
        self.command = command
        self.created_at = created_at
        self.return_code = return_code
        self.hits = 0
        #: Puts before this one since the store was made: newest first sorts on it.
        self.order = order
        self.scope = scope


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
        retain: float = 0.0,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: Seconds an expired entry is kept for readers that accept a stale answer.
        self.retain = retain
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._puts = 0
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._coalesced = 0
        self._stale_hits = 0

    def get(self, key: str) -> bytes | None:
        found = self.get_stale(key, 0.0)
        return None if found is None else found[0]

    async def get_async(self, key: str) -> bytes | None:
        return self.get(key)

    def get_stale(self, key: str, stale: float) -> tuple[bytes, bool] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            now = self._clock()
            if answers(entry.expires_at, now, stale):
                self._entries.move_to_end(key)
                expired = is_stale(entry.expires_at, now)
                self._hits += 1
                self._stale_hits += expired
                entry.hits += 1
                return entry.value, expired
            # Kept while retained, for a reader that accepts it stale (even while
            # this reader's run refreshes it); its expiration counts when it goes.
            if not answers(entry.expires_at, now, self.retain):
                self._remove(key, entry)
                self._expirations += 1
            self._misses += 1
            return None

    def put(
        self,
        key: str,
        value: bytes,
        ttl: float,
        epoch: int,
        command: str = "",
        return_code: int = 0,
        scope: str = "",
    ) -> bool:
        size = len(value)
        with self._lock:
            if epoch != self._epoch or size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            now = self._clock()
            if old is not None:
                self._bytes -= len(old.value)
                self._expirations += old.expires_at <= now  # a retained one, replaced
            self._puts += 1
            self._entries[key] = _Entry(
                value, now + ttl, command, now, return_code, self._puts, scope
            )
            self._bytes += size
            self._shrink_to_bounds()
            return True

    def _shrink_to_bounds(self) -> None:
        # The least recently used entry goes first; if it had already expired,
        # that is an expiration, not an eviction.
        now = self._clock()
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            key, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry.value)
            if entry.expires_at <= now:
                self._expirations += 1
            else:
                self._evictions += 1

    def _remove(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= len(entry.value)

    def epoch(self) -> int:
        return self._epoch

    def peek(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.expires_at <= self._clock():
                return None
            return entry.value

    def entries(
        self, prefix: str, offset: int, limit: int, scope: str | None = None
    ) -> list[EntryInfo]:
        with self._lock:
            now = self._clock()
            found = [
                (key, entry)
                for key, entry in self._entries.items()
                if entry.expires_at > now
                and entry.command.startswith(prefix)
                and scope in (None, entry.scope)
            ]
            found.sort(key=lambda item: item[1].order, reverse=True)
            return [self._info(key, entry) for key, entry in found[offset : offset + limit]]

    def entry(self, key: str) -> tuple[EntryInfo, bytes] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.expires_at <= self._clock():
                return None
            return self._info(key, entry), entry.value

    def _info(self, key: str, entry: _Entry) -> EntryInfo:
        # This store's clock is monotonic by default: its readings become wall-clock
        # times by the clocks' difference now, the only moment both can be read.
        to_wall = time.time() - self._clock()
        return EntryInfo(
            key=key,
            command=entry.command,
            size=len(entry.value),
            created_at=entry.created_at + to_wall,
            expires_at=entry.expires_at + to_wall,
            hits=entry.hits,
            return_code=entry.return_code,
            scope=entry.scope,
        )

    def delete(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.expires_at <= self._clock():
                return False
            self._remove(key, entry)
            return True

    def delete_matching(self, match: CommandMatch, scope: str | None = None) -> int:
        """The commands are tested outside the lock, which the event loop's lookups take:
        the lock is held to copy the entries, then to remove those that matched and
        are still the same entries (one replaced meanwhile stays)."""
        with self._lock:
            now = self._clock()
            live = [(key, entry) for key, entry in self._entries.items() if entry.expires_at > now]
        doomed = [
            (key, entry)
            for key, entry in live
            if scope in (None, entry.scope) and match(entry.command)
        ]
        with self._lock:
            gone = [(key, entry) for key, entry in doomed if self._entries.get(key) is entry]
            for key, entry in gone:
                self._remove(key, entry)
            return len(gone)

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
        # So that ``size`` and ``bytes`` count only entries that could be served
        # (stale ones too, while they are retained).
        now = self._clock() - self.retain
        expired = [(key, entry) for key, entry in self._entries.items() if entry.expires_at <= now]
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
            stale_hits=self._stale_hits,
        )

    def close(self) -> None:
        """Nothing to release: the entries go with the process."""

    async def aclose(self) -> None:
        """Nothing to release."""
