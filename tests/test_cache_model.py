"""Every store against a model of the cache's rules, on sequences Hypothesis makes up.

The model is a few lines of plain Python: an ordered dict in least recently
used order, expiry on the fake clock, and the counts. Hypothesis runs random
sequences of get, put (current or stale epoch), clear, clock ticks, coalesced
counts and stats against a store and the model side by side; with three
entries and 24 bytes at most, puts evict all the time.

One case is left to each store: which entry a put pushes out while expired
entries are still held (the least recently used one, or an expired one first).
Before such a put the machine takes the stats, which drops expired entries in
every store, so the model never has to guess.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

from runcache.stores import Store

from conftest import FakeClock, StoreFactory

MAX_ENTRIES = 3
MAX_BYTES = 24

KEYS = st.sampled_from("abcde")
VALUES = st.binary(min_size=1, max_size=9)
TTLS = st.integers(10, 60)
#: Mostly short ticks, so entries live through several steps before they expire;
#: sums of them land exactly on a ttl now and then, the boundary of expiry.
TICKS = st.sampled_from([1, 1, 2, 3, 5, 10, 70])
#: Mostly current epochs: a stale put changes nothing, so it makes a dull step.
STALE = st.sampled_from([False, False, False, True])
#: A clear wipes everything the steps before it built up, so most picks skip it.
SELDOM = st.sampled_from([True, *[False] * 7])


@dataclass
class Model:
    """What a store must hold and count, in the simplest code that says so."""

    max_entries: int
    max_bytes: int
    entries: OrderedDict[str, tuple[bytes, float]] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    coalesced: int = 0

    @property
    def size_in_bytes(self) -> int:
        return sum(len(value) for value, _ in self.entries.values())

    def holds_expired(self, now: float) -> bool:
        return any(expires <= now for _, expires in self.entries.values())

    def get(self, key: str, now: float) -> bytes | None:
        entry = self.entries.get(key)
        if entry is not None and entry[1] <= now:
            del self.entries[key]
            self.expirations += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, value: bytes, ttl: float, now: float, current: bool) -> bool:
        if not current or len(value) > self.max_bytes:
            return False
        self.entries.pop(key, None)
        self.entries[key] = (value, now + ttl)
        while len(self.entries) > self.max_entries or self.size_in_bytes > self.max_bytes:
            self.entries.popitem(last=False)  # live: expired ones were dropped before the put
            self.evictions += 1
        return True

    def purge(self, now: float) -> None:
        expired = [key for key, (_, expires) in self.entries.items() if expires <= now]
        for key in expired:
            del self.entries[key]
        self.expirations += len(expired)

    def clear(self) -> tuple[int, int, int, int]:
        before = (self.hits, self.misses, self.evictions, self.coalesced)
        self.entries.clear()
        self.hits = self.misses = self.evictions = self.expirations = self.coalesced = 0
        return before


class CacheMachine(RuleBasedStateMachine):
    """A store and the model, driven by the same steps; any difference fails."""

    #: Keys put so far: gets draw from these as often as from all keys, so they hit.
    written = Bundle("written")

    def __init__(self, store: Store, clock: FakeClock) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        # Each example starts from an empty store; the epoch before that clear is stale.
        self.stale_epoch = store.epoch()
        store.clear()
        self.epoch = store.epoch()
        self.model = Model(MAX_ENTRIES, MAX_BYTES)

    @rule(key=written | KEYS)
    def get(self, key: str) -> None:
        assert self.store.get(key) == self.model.get(key, self.clock())

    @rule(target=written, key=KEYS, value=VALUES, ttl=TTLS, stale=STALE)
    def put(self, key: str, value: bytes, ttl: int, stale: bool) -> str:
        if self.model.holds_expired(self.clock()):
            self.stats()
        epoch = self.stale_epoch if stale else self.epoch
        stored = self.store.put(key, value, ttl, epoch)
        assert stored == self.model.put(key, value, ttl, self.clock(), current=not stale)
        return key

    @rule(seconds=TICKS)
    def tick(self, seconds: int) -> None:
        self.clock.tick(seconds)

    @rule()
    def record_coalesced(self) -> None:
        self.store.record_coalesced()
        self.model.coalesced += 1
        self.stats()

    @rule(now=SELDOM)
    def clear(self, now: bool) -> None:
        if not now:
            return
        before = self.store.clear()
        assert (before.hits, before.misses, before.evictions, before.coalesced) == (
            self.model.clear()
        )
        self.stale_epoch, self.epoch = self.epoch, self.store.epoch()
        assert self.epoch != self.stale_epoch

    @rule()
    def stats(self) -> None:
        stats = self.store.stats()
        model = self.model
        model.purge(self.clock())
        assert (stats.hits, stats.misses, stats.evictions, stats.expirations) == (
            model.hits,
            model.misses,
            model.evictions,
            model.expirations,
        )
        assert (stats.coalesced, stats.size, stats.bytes) == (
            model.coalesced,
            len(model.entries),
            model.size_in_bytes,
        )
        assert (stats.max_size, stats.max_bytes) == (MAX_ENTRIES, MAX_BYTES)


# Not on the Redis Cluster: the same scripts as on one Redis, only routed, and its
# routing is the store suite's and tests/test_store_cluster.py's to check.
@pytest.mark.parametrize("store_factory", ["memory", "sqlite", "redis"], indirect=True)
def test_every_store_behaves_like_the_model(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES)

    class OnThisStore(CacheMachine):
        """The machine on this test's store: Hypothesis's annotation asks for a class."""

        def __init__(self) -> None:
            super().__init__(store, fake_clock)

    run_state_machine_as_test(
        OnThisStore,
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
