"""The interface every store implements, and the one test suite checks them all against.

A store is a whole cache, not a dictionary: it enforces the entry and byte
bounds, evicts the least recently used entry first, expires entries, and counts
hits, misses, evictions and expirations. It does so itself because SQLite and
Redis stores must keep those rules across every process that shares them.

The *epoch* is a counter that :meth:`Store.clear` advances. A caller reads it
before running a command and passes it to :meth:`Store.put`; a put whose epoch
is stale is dropped, so nothing that began before a clear is in the cache after it.

Each entry also carries what an operator lists it by (:class:`EntryInfo`): the
command that made it, when it was stored, and how many hits it served. Listing,
reading, deleting and invalidating entries count no hit, miss or expiration.

A store made with ``retain`` seconds keeps an expired entry that long past its
expiry (within its bounds, least recently used first as ever), so a reader that
accepts a stale answer (:meth:`Store.get_stale`) can be given one while the entry
is refreshed. An expired entry is still never listed, peeked at or answered to a
reader that does not accept it; such a reader removes it, counting an expiration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

#: Seconds one call to a store that may hang (SQLite, Redis) may take before it fails
#: and the request goes on without the store: the ``--store-timeout`` setting.
DEFAULT_TIMEOUT = 0.5


def answers(expires_at: float, now: float, stale: float) -> bool:
    """Whether an entry expiring at ``expires_at`` answers a reader that accepts ``stale``
    seconds past expiry (0: a live entry only). The rule of a stale answer, here once:
    the memory store calls it, and the SQLite and Redis stores, which must apply it
    inside their own transaction, write the same comparison (``expires_at > now - stale``)
    in SQL and in Lua; the store suite checks all three at its edges."""
    return expires_at > now - stale


def is_stale(expires_at: float, now: float) -> bool:
    """Whether an entry that answers has expired: a stale answer, refreshed meanwhile."""
    return expires_at <= now


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
    #: Hits answered with an entry that had expired, but by less than the reader
    #: accepted (``"stale": S``); counted in ``hits`` too.
    stale_hits: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass(frozen=True)
class EntryInfo:
    """One live entry as an operator sees it, without its value.

    Times are seconds since the epoch (on the store's clock, which is the wall
    clock unless a test passes another). An entry stored by a runcache older than
    these fields has an empty ``command`` and a ``created_at`` of 0.
    """

    key: str
    command: str
    size: int
    created_at: float
    expires_at: float
    #: Hits this entry served since it was stored.
    hits: int
    return_code: int
    #: The scope of the request that stored it ("" for none, and for an entry stored
    #: by a runcache older than scopes).
    scope: str = ""


#: A test of an entry's command, for :meth:`Store.delete_matching`.
CommandMatch = Callable[[str], bool]


def any_command(command: str) -> bool:
    """The :data:`CommandMatch` of an invalidation that names no command, only a scope."""
    return True


class Store(Protocol):
    """A bounded, expiring, least-recently-used cache of byte strings."""

    #: The store's URL with any password masked, for logs and ``/health``.
    description: str

    #: Whether a call may block on I/O (a disk, the network). An async caller
    #: must run the calls of a blocking store in a worker thread, or one slow
    #: disk or Redis would stall every request on the event loop; a store that
    #: only touches memory can be called on the loop itself, saving the hop.
    blocking: bool

    def get(self, key: str) -> bytes | None:
        """Return the live value for ``key`` and mark it most recently used.

        Counts a hit, or a miss (and an expiration when the entry had expired).
        """
        ...

    async def get_async(self, key: str) -> bytes | None:
        """:meth:`get` for the event loop: the hit path, whatever ``blocking`` says.

        A hit is what a cache answers most, so it is awaited without a hop to a
        worker thread, which on two cores costs more than the hit itself (the
        thread must win the GIL back from a busy loop): memory and SQLite answer
        in place (a SQLite hit is one short transaction), Redis through
        ``redis.asyncio``, serving other requests while Redis answers. What
        it opens belongs to the running loop until :meth:`aclose`.
        """
        ...

    def get_stale(self, key: str, stale: float) -> tuple[bytes, bool] | None:
        """:meth:`get` for a reader that accepts an entry expired less than ``stale``
        seconds ago: the value and whether it had expired (a stale hit, counted as a hit
        and as a stale hit). Only a store made with ``retain`` keeps expired entries
        that long; any other store finds none.
        """
        ...

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
        """Store ``value`` for ``ttl`` seconds, evicting least recently used entries to fit.

        ``command``, ``return_code`` and ``scope`` are kept beside it for :meth:`entries`
        and :meth:`delete_matching`; the entry's hit count starts at 0. Returns False,
        storing nothing, when ``epoch`` is no longer current or the value alone is larger
        than the byte bound.
        """
        ...

    def epoch(self) -> int:
        """The current clear counter."""
        ...

    def record_coalesced(self) -> None:
        """Count a request that was answered by another request's run."""
        ...

    def clear(self) -> CacheStats:
        """Empty the store, reset every count and advance the epoch, as one step.

        Returns the statistics as they were just before the clear.
        """
        ...

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counts and sizes."""
        ...

    def peek(self, key: str) -> bytes | None:
        """Return the live value for ``key`` without counting or reordering anything.

        An instance waiting for another instance's run polls with this, so the
        wait itself is not a string of misses.
        """
        ...

    def entries(
        self, prefix: str, offset: int, limit: int, scope: str | None = None
    ) -> list[EntryInfo]:
        """Live entries whose command starts with ``prefix`` (and, given a ``scope``, of
        that scope alone), newest first: ``limit`` of them after skipping ``offset``.
        Counts nothing and reorders nothing."""
        ...

    def entry(self, key: str) -> tuple[EntryInfo, bytes] | None:
        """A live entry and its value, counting nothing and reordering nothing."""
        ...

    def delete(self, key: str) -> bool:
        """Remove a live entry; whether there was one. Counts no eviction or expiration."""
        ...

    def delete_matching(self, match: CommandMatch, scope: str | None = None) -> int:
        """Remove every live entry whose command ``match`` accepts (and, given a ``scope``,
        of that scope alone); how many it removed. A scope's entries are found by the
        scope, not by testing every entry of the store.

        A shared store may do this in batches, so entries stored meanwhile may or
        may not be tested; each batch keeps the counts consistent.
        """
        ...

    def acquire(self, key: str, lease: float) -> str | None:
        """Take the lock that lets one instance run ``key``'s command; None if another holds it.

        Returns a token for :meth:`release`. The lock lapses after ``lease``
        seconds, so a holder that crashed cannot block the others for good. A
        store that only one process uses returns a token at once: the engine's
        in-process single flight already runs each key once.
        """
        ...

    def release(self, key: str, token: str) -> None:
        """Give up the lock taken by :meth:`acquire`, if ``token`` still holds it."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...

    async def aclose(self) -> None:
        """Release what :meth:`get_async` opened, on the loop it opened it on."""
        ...


def stats_from_counts(counts: Iterable[Any], max_entries: int, max_bytes: int) -> CacheStats:
    """Statistics from the counts a shared store keeps, in the order hits, misses,
    evictions, expirations, coalesced, size, bytes, stale hits; a count never written
    yet (None) is 0, and Redis's byte strings of digits are numbers."""
    hits, misses, evictions, expirations, coalesced, size, total, stale_hits = (
        int(count or 0) for count in counts
    )
    return CacheStats(
        hits=hits,
        misses=misses,
        evictions=evictions,
        expirations=expirations,
        coalesced=coalesced,
        size=size,
        max_size=max_entries,
        bytes=total,
        max_bytes=max_bytes,
        stale_hits=stale_hits,
    )
