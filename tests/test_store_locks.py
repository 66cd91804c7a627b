"""The cross-process single-flight lock, checked against every store that processes share.

``acquire``, ``release`` and the lease are the same contract for SQLite and
Redis, so one suite runs over both through ``shared_store_factory``; what only
one of them has to get right (SQLite sweeping lapsed locks, Redis keeping the
lease as its own key expiry) stays in ``test_store_sqlite.py`` and
``test_store_redis.py``. The memory store has no lock to share: it grants every
``acquire`` at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runcache.stores import MemoryStore, Store, open_store
from runcache.stores.redis import RedisStore

from conftest import FakeClock, RedisServer

#: Seconds of every lease in this suite; long enough never to lapse unless a test says so.
LEASE = 5.0


class SharedStoreFactory:
    """Stores of one kind that share one SQLite file or one Redis, all on one fake clock.

    Stores made with the same namespace are instances of one cache, as two
    runcache processes sharing a store are; each test gets namespaces of its own.
    """

    def __init__(self, location: str, clock: FakeClock) -> None:
        self.location = location
        self.clock = clock
        self.base = f"test-{uuid.uuid4().hex}"
        self.made: list[Store] = []

    def __call__(self, namespace: str = "") -> Store:
        name = f"{self.base}-{namespace}" if namespace else self.base
        store = open_store(f"{self.location}?namespace={name}", 100, 1 << 20, clock=self.clock)
        self.made.append(store)
        return store

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the leases of every store made.

        SQLite reads lease ends on the store's clock, so ticking the fake clock
        is enough. Redis keeps a lease as its key's own expiry, on Redis's
        clock, so each lock's remaining time is shortened as much (and the lock
        removed once none is left); ``test_store_redis.py`` checks that a lock
        really lapses in Redis, in real time.
        """
        self.clock.tick(seconds)
        # One store per namespace: stores of one namespace hold the same locks.
        redis_stores = [store for store in self.made if isinstance(store, RedisStore)]
        for store in {store.lock_prefix: store for store in redis_stores}.values():
            for lock in store.client.scan_iter(match=store.lock_prefix + "*"):
                left = store.client.pttl(lock) - round(seconds * 1000)
                if left > 0:
                    store.client.pexpire(lock, left)
                else:
                    store.client.delete(lock)

    def close(self) -> None:
        for store in self.made:
            store.close()


@pytest.fixture(params=["sqlite", "redis"])
def shared_store_factory(
    request: pytest.FixtureRequest, fake_clock: FakeClock, tmp_path: Path
) -> Iterator[SharedStoreFactory]:
    """Make shared stores of one kind; every test that takes this runs once per kind."""
    if request.param == "sqlite":
        location = f"sqlite://{tmp_path / 'shared.db'}"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        location = server.url
    factory = SharedStoreFactory(location, fake_clock)
    yield factory
    factory.close()


def test_a_lock_is_held_by_one_instance_at_a_time(
    shared_store_factory: SharedStoreFactory,
) -> None:
    one, two = shared_store_factory(), shared_store_factory()
    assert one.acquire("k", LEASE) is not None
    assert two.acquire("k", LEASE) is None
    assert one.acquire("k", LEASE) is None, "not even its holder takes it twice"
    assert two.acquire("other", LEASE) is not None, "a lock holds one key only"


def test_only_the_holders_token_releases_the_lock(
    shared_store_factory: SharedStoreFactory,
) -> None:
    one, two = shared_store_factory(), shared_store_factory()
    token = one.acquire("k", LEASE)
    assert token is not None
    two.release("k", "not-the-token")
    assert two.acquire("k", LEASE) is None
    one.release("k", token)
    assert two.acquire("k", LEASE) is not None


def test_a_crashed_holders_lock_lapses_after_its_lease(
    shared_store_factory: SharedStoreFactory,
) -> None:
    one, two = shared_store_factory(), shared_store_factory()
    stale = one.acquire("k", LEASE)
    assert stale is not None
    shared_store_factory.advance(LEASE - 1)
    assert two.acquire("k", LEASE) is None, "held until the lease is over"
    shared_store_factory.advance(1.5)
    fresh = two.acquire("k", LEASE)
    assert fresh is not None and fresh != stale


def test_a_lapsed_holder_cannot_release_its_successor(
    shared_store_factory: SharedStoreFactory,
) -> None:
    one, two = shared_store_factory(), shared_store_factory()
    stale = one.acquire("k", LEASE)
    assert stale is not None
    shared_store_factory.advance(LEASE + 0.5)
    assert two.acquire("k", LEASE) is not None
    one.release("k", stale)
    assert one.acquire("k", LEASE) is None


def test_locks_are_per_namespace(shared_store_factory: SharedStoreFactory) -> None:
    team_a, team_b = shared_store_factory("team-a"), shared_store_factory("team-b")
    assert team_a.acquire("k", LEASE) is not None
    assert team_b.acquire("k", LEASE) is not None
    assert shared_store_factory("team-a").acquire("k", LEASE) is None


def test_a_clear_leaves_locks_alone(shared_store_factory: SharedStoreFactory) -> None:
    store = shared_store_factory()
    assert store.acquire("k", LEASE) is not None
    store.put("k", b"v", 60, store.epoch())
    store.clear()
    # A command that began before the clear is still running; its twin must wait.
    assert shared_store_factory().acquire("k", LEASE) is None


def test_the_memory_store_grants_every_lock_at_once() -> None:
    """One process only: the engine's own single flight already runs each key once."""
    store = MemoryStore(10, 1000)
    first, second = store.acquire("k", LEASE), store.acquire("k", LEASE)
    assert first is not None and second is not None
    store.release("k", "not-the-token")
    assert store.acquire("k", LEASE) is not None
