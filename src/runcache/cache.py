"""The cache as the engine sees it: a store, its statistics, and what happens when it fails.

Each store keeps the cache's rules itself (bounds, least recently used first,
expiry, counts), because for SQLite and Redis those rules must hold across
processes. What lives here is what every store shares: the statistics record
and :class:`Cache`, which stands between the engine and a store so that a
failing store degrades runcache to running commands uncached instead of failing
requests.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from runcache.errors import StoreError

if TYPE_CHECKING:
    from runcache.stores.base import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a store's counts, taken in one step."""

    hits: int
    misses: int
    evictions: int
    expirations: int
    coalesced: int
    size: int
    max_size: int
    bytes: int
    max_bytes: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of ``GET /api/cache/stats``; ``hit_rate`` is the contract's string."""
        fields = asdict(self)
        fields["hit_rate"] = f"{self.hit_ratio * 100:.1f}%"
        fields["hit_ratio"] = round(self.hit_ratio, 6)
        return fields


class Cache:
    """A store plus fault tolerance: store errors become misses, logged once per outage.

    While the store is failing, :attr:`degraded_reason` says why; the first call
    that succeeds again clears it and logs the recovery.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._fault_lock = threading.Lock()
        self._degraded_reason: str | None = None

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded_reason

    def get(self, key: str) -> bytes | None:
        try:
            value = self.store.get(key)
        except StoreError as error:
            self._failed(error)
            return None
        self._succeeded()
        return value

    def put(self, key: str, value: bytes, ttl: float, epoch: int | None) -> bool:
        """Store a result unless the store is down or was cleared since ``epoch`` was read."""
        if epoch is None:
            return False
        try:
            stored = self.store.put(key, value, ttl, epoch)
        except StoreError as error:
            self._failed(error)
            return False
        self._succeeded()
        return stored

    def epoch(self) -> int | None:
        """The store's clear counter, or None when the store cannot be reached."""
        try:
            epoch = self.store.epoch()
        except StoreError as error:
            self._failed(error)
            return None
        self._succeeded()
        return epoch

    def record_coalesced(self) -> None:
        try:
            self.store.record_coalesced()
        except StoreError as error:
            self._failed(error)

    def clear(self) -> CacheStats:
        """Empty the store and reset its counts; raises StoreError if the store is down."""
        try:
            before = self.store.clear()
        except StoreError as error:
            self._failed(error)
            raise
        self._succeeded()
        return before

    def stats(self) -> CacheStats:
        """The store's statistics; raises StoreError if the store is down."""
        try:
            stats = self.store.stats()
        except StoreError as error:
            self._failed(error)
            raise
        self._succeeded()
        return stats

    def close(self) -> None:
        self.store.close()

    def _failed(self, error: StoreError) -> None:
        with self._fault_lock:
            first = self._degraded_reason is None
            self._degraded_reason = error.message
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
