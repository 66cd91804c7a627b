"""The cache's rules, checked against every store through the parametrized ``store_factory``."""

from __future__ import annotations

import asyncio
import fnmatch
import random
import threading

import pytest

from runcache.engine.engine import stats_answer
from runcache.stores import MemoryStore, Store
from runcache.stores.base import CacheStats, any_command
from runcache.stores.redis import RedisStore
from runcache.stores.sqlite import SqliteStore

from conftest import FakeClock, StoreFactory


def test_get_of_missing_key_is_a_miss(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.get("absent") is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.size) == (0, 1, 0)


def test_put_then_get_is_a_hit(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.put("k", b'{"v":1}', 60, store.epoch())
    assert store.get("k") == b'{"v":1}'
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.size, stats.bytes) == (1, 0, 1, 7)


def test_put_replaces_value_and_byte_count(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.put("k", b"12345", 60, store.epoch())
    store.put("k", b"12", 60, store.epoch())
    assert store.get("k") == b"12"
    stats = store.stats()
    assert (stats.size, stats.bytes) == (1, 2)


def test_least_recently_used_is_evicted_first(store_factory: StoreFactory) -> None:
    store = store_factory(max_entries=3)
    epoch = store.epoch()
    for key in ("a", "b", "c"):
        store.put(key, key.encode(), 60, epoch)
    assert store.get("a") == b"a"  # "b" is now the least recently used
    store.put("d", b"d", 60, epoch)
    assert store.get("b") is None
    assert [store.get(key) for key in ("a", "c", "d")] == [b"a", b"c", b"d"]
    stats = store.stats()
    assert (stats.evictions, stats.size, stats.max_size) == (1, 3, 3)


def test_byte_bound_evicts_until_the_new_value_fits(store_factory: StoreFactory) -> None:
    store = store_factory(max_entries=100, max_bytes=10)
    epoch = store.epoch()
    store.put("a", b"1234", 60, epoch)
    store.put("b", b"1234", 60, epoch)
    store.put("c", b"123456", 60, epoch)  # 14 bytes: "a" must go
    assert store.get("a") is None
    assert store.get("b") == b"1234"
    assert store.get("c") == b"123456"
    stats = store.stats()
    assert (stats.bytes, stats.evictions, stats.max_bytes) == (10, 1, 10)


def test_value_larger_than_the_byte_bound_is_not_stored(store_factory: StoreFactory) -> None:
    store = store_factory(max_bytes=10)
    epoch = store.epoch()
    store.put("small", b"12", 60, epoch)
    assert not store.put("huge", b"x" * 11, 60, epoch)
    assert store.get("huge") is None
    assert store.get("small") == b"12"
    assert store.stats().evictions == 0


def test_entry_expires_after_its_ttl(store_factory: StoreFactory, fake_clock: FakeClock) -> None:
    store = store_factory()
    store.put("k", b"v", 10, store.epoch())
    fake_clock.tick(9.9)
    assert store.get("k") == b"v"
    fake_clock.tick(0.2)
    assert store.get("k") is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.evictions) == (1, 1, 1, 0)
    assert stats.size == 0


def test_each_entry_keeps_its_own_ttl(store_factory: StoreFactory, fake_clock: FakeClock) -> None:
    store = store_factory()
    epoch = store.epoch()
    store.put("short", b"s", 5, epoch)
    store.put("long", b"l", 50, epoch)
    fake_clock.tick(6)
    assert store.get("short") is None
    assert store.get("long") == b"l"
    fake_clock.tick(45)
    assert store.get("long") is None
    assert store.stats().expirations == 2


def test_stats_do_not_count_expired_entries(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory()
    store.put("k", b"value", 5, store.epoch())
    fake_clock.tick(6)
    stats = store.stats()
    assert (stats.size, stats.bytes, stats.expirations) == (0, 0, 1)


def test_expired_entry_pushed_out_by_bounds_counts_as_expiration(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(max_entries=1)
    store.put("old", b"o", 5, store.epoch())
    fake_clock.tick(6)
    store.put("new", b"n", 5, store.epoch())
    stats = store.stats()
    assert (stats.evictions, stats.expirations, stats.size) == (0, 1, 1)


def test_clear_empties_and_resets_every_count(store_factory: StoreFactory) -> None:
    store = store_factory(max_entries=2)
    epoch = store.epoch()
    for key in ("a", "b", "c"):
        store.put(key, b"x", 60, epoch)
    store.get("c")
    store.get("a")
    store.record_coalesced()
    before = store.clear()
    assert (before.hits, before.misses, before.evictions, before.coalesced) == (1, 1, 1, 1)
    assert before.size == 2
    after = store.stats()
    assert after == CacheStats(0, 0, 0, 0, 0, 0, 2, 0, store.stats().max_bytes)
    assert stats_answer(after).hit_rate == "0.0%"
    assert store.get("c") is None


def test_put_from_before_a_clear_is_dropped(store_factory: StoreFactory) -> None:
    store = store_factory()
    epoch = store.epoch()
    store.clear()
    assert not store.put("k", b"stale", 60, epoch)
    assert store.get("k") is None
    assert store.put("k", b"fresh", 60, store.epoch())


def test_peek_neither_counts_nor_reorders(store_factory: StoreFactory) -> None:
    store = store_factory(max_entries=2)
    epoch = store.epoch()
    store.put("a", b"1", 60, epoch)
    store.put("b", b"2", 60, epoch)
    assert store.peek("a") == b"1" and store.peek("absent") is None
    store.put("c", b"3", 60, epoch)  # "a" is still the least recently used
    assert store.peek("a") is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (0, 0, 1)


def test_peek_sees_only_live_entries_and_leaves_expiry_to_get(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory()
    store.put("k", b"v", 10, store.epoch())
    fake_clock.tick(10.1)
    assert store.peek("k") is None
    assert store.get("k") is None
    stats = store.stats()
    assert (stats.misses, stats.expirations) == (1, 1)


def test_hit_rate_is_the_contract_string(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.put("k", b"v", 60, store.epoch())
    for _ in range(7):
        store.get("k")
    store.get("absent")
    stats = stats_answer(store.stats())
    assert stats.hit_rate == "87.5%"
    assert stats.hit_ratio == 0.875


def test_concurrent_get_put_clear_loses_no_count(store_factory: StoreFactory) -> None:
    """8 threads of mixed operations: no error, and every lookup is counted exactly once.

    ``clear`` returns the counts it reset, so the counts of every clear plus the
    final counts must add up to all the lookups the threads made.
    """
    store = store_factory(max_entries=16, max_bytes=4096)
    operations = 2500
    lookups = [0] * 8
    cleared: list[CacheStats] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        rng = random.Random(index)
        try:
            for _ in range(operations):
                roll = rng.random()
                key = f"k{rng.randrange(40)}"
                if roll < 0.6:
                    store.get(key)
                    lookups[index] += 1
                elif roll < 0.98:
                    store.put(key, b"v" * rng.randrange(1, 300), 60, store.epoch())
                else:
                    cleared.append(store.clear())
        except BaseException as error:  # noqa: B036 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not any(thread.is_alive() for thread in threads), "a worker never finished"
    assert errors == []
    final = store.stats()
    counted = final.lookups + sum(stats.lookups for stats in cleared)
    assert counted == sum(lookups)
    assert final.size <= 16 and final.bytes <= 4096


def test_only_the_memory_store_may_be_called_on_the_event_loop(
    store_factory: StoreFactory,
) -> None:
    """SQLite waits on the disk and Redis on the network, so an async caller needs a thread."""
    store = store_factory()
    expected = {MemoryStore: False, SqliteStore: True, RedisStore: True}[type(store)]
    assert store.blocking is expected


def test_get_async_is_get_on_the_event_loop(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.put("k", b"v", 60, store.epoch())

    async def look_up() -> tuple[bytes | None, bytes | None]:
        try:
            return await store.get_async("k"), await store.get_async("missing")
        finally:
            await store.aclose()

    # Twice, on two loops in turn: what the hit path opens belongs to one loop.
    assert asyncio.run(look_up()) == (b"v", None)
    assert asyncio.run(look_up()) == (b"v", None)
    stats = store.stats()
    assert (stats.hits, stats.misses) == (2, 2)


# -- entries: listing, reading, deleting and invalidating ----------------------------


def _commands(store: Store, prefix: str = "", offset: int = 0, limit: int = 100) -> list[str]:
    return [info.command for info in store.entries(prefix, offset, limit)]


def test_entries_are_listed_newest_first_with_what_describes_them(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory()
    store.put("a", b"12345", 60, store.epoch(), command="echo a")
    fake_clock.tick(1)
    store.put("b", b"123", 30, store.epoch(), command="echo b", return_code=0)
    store.get("b")
    store.get("b")
    store.get("a")
    newest, oldest = store.entries("", 0, 10)
    assert (newest.key, newest.command, newest.size, newest.hits) == ("b", "echo b", 3, 2)
    assert (oldest.key, oldest.command, oldest.size, oldest.hits) == ("a", "echo a", 5, 1)
    assert newest.return_code == oldest.return_code == 0
    assert newest.expires_at - newest.created_at == pytest.approx(30, abs=0.01)
    assert oldest.expires_at - oldest.created_at == pytest.approx(60, abs=0.01)
    assert newest.created_at - oldest.created_at == pytest.approx(1, abs=0.01)


def test_listing_and_reading_entries_count_and_reorder_nothing(
    store_factory: StoreFactory,
) -> None:
    store = store_factory(max_entries=2)
    epoch = store.epoch()
    store.put("a", b"1", 60, epoch, command="echo a")
    store.put("b", b"2", 60, epoch, command="echo b")
    before = store.stats()
    assert _commands(store) == ["echo b", "echo a"]
    found = store.entry("a")
    assert found is not None and found[1] == b"1" and found[0].hits == 0
    assert store.entry("absent") is None
    assert store.stats() == before
    store.put("c", b"3", 60, epoch, command="echo c")  # "a" is still the least recently used
    assert _commands(store) == ["echo c", "echo b"]


def test_entries_match_a_prefix_of_the_command_and_page(store_factory: StoreFactory) -> None:
    store = store_factory()
    epoch = store.epoch()
    for index, command in enumerate(["git status", "ls -l", "git log", "gitk", "git diff"]):
        store.put(f"k{index}", b"v", 60, epoch, command=command)
    assert _commands(store, "git ") == ["git diff", "git log", "git status"]
    assert _commands(store, "git ", offset=1, limit=1) == ["git log"]
    assert _commands(store, "git ", offset=3) == []
    assert _commands(store, limit=2) == ["git diff", "gitk"]
    assert _commands(store, "GIT") == []


def test_a_put_again_is_the_newest_entry_and_counts_its_hits_anew(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    epoch = store.epoch()
    store.put("a", b"1", 60, epoch, command="echo a")
    store.put("b", b"2", 60, epoch, command="echo b")
    store.get("a")
    store.put("a", b"11", 60, epoch, command="echo a")
    assert [(info.key, info.hits, info.size) for info in store.entries("", 0, 10)] == [
        ("a", 0, 2),
        ("b", 0, 1),
    ]


def test_expired_entries_are_neither_listed_nor_read_nor_counted_by_it(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory()
    store.put("k", b"v", 10, store.epoch(), command="echo k")
    fake_clock.tick(10.1)
    assert store.entries("", 0, 10) == []
    assert store.entry("k") is None
    assert not store.delete("k")
    assert store.delete_matching(lambda command: True) == 0
    assert store.get("k") is None  # the expiry is still there to be counted, once
    stats = store.stats()
    assert (stats.misses, stats.expirations, stats.size) == (1, 1, 0)


def test_delete_removes_one_live_entry_and_counts_no_eviction(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    epoch = store.epoch()
    store.put("a", b"123", 60, epoch, command="echo a")
    store.put("b", b"45", 60, epoch, command="echo b")
    assert store.delete("a")
    assert not store.delete("a")
    assert not store.delete("absent")
    assert store.peek("a") is None and store.peek("b") == b"45"
    stats = store.stats()
    assert (stats.size, stats.bytes, stats.evictions, stats.expirations) == (1, 2, 0, 0)
    assert (stats.hits, stats.misses) == (0, 0)
    assert store.put("a", b"6", 60, epoch, command="echo a")
    assert _commands(store) == ["echo a", "echo b"]


def test_delete_matching_removes_the_entries_whose_command_matches(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    epoch = store.epoch()
    commands = ["nmap -sV a", "nmap b", "git -C x status", "git status", "echo nmap "]
    for index, command in enumerate(commands):
        store.put(f"k{index}", b"vv", 60, epoch, command=command)
    assert store.delete_matching(lambda command: command.startswith("nmap ")) == 2
    assert store.delete_matching(lambda command: fnmatch.fnmatchcase(command, "git * status")) == 1
    assert _commands(store) == ["echo nmap ", "git status"]
    stats = store.stats()
    assert (stats.size, stats.bytes, stats.evictions, stats.hits, stats.misses) == (2, 4, 0, 0, 0)


def test_entries_beyond_one_batch_are_listed_and_invalidated(
    store_factory: StoreFactory,
) -> None:
    """More entries than a shared store handles per step (``redis.BATCH``)."""
    store = store_factory(max_entries=3000)
    epoch = store.epoch()
    count = 1200
    for index in range(count):
        store.put(f"k{index}", b"v", 60, epoch, command=f"{'odd' if index % 2 else 'even'} {index}")
    listed = store.entries("", 550, 100)
    assert [info.key for info in listed] == [f"k{index}" for index in range(649, 549, -1)]
    assert [info.key for info in store.entries("odd ", 500, 3)] == ["k199", "k197", "k195"]
    assert store.delete_matching(lambda command: command.startswith("odd ")) == count // 2
    assert store.stats().size == count // 2
    assert len(store.entries("", 0, count)) == count // 2
    store.clear()
    assert store.entries("", 0, count) == [] and store.get("k0") is None


def test_an_entry_stored_after_a_clear_is_listed_and_kept(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.put("k", b"old", 60, store.epoch(), command="echo k")
    store.clear()
    assert store.entries("", 0, 10) == []
    store.put("k", b"new", 60, store.epoch(), command="echo k")
    assert _commands(store) == ["echo k"]
    assert store.get("k") == b"new"


# -- scopes: a namespace of its own, listed and invalidated as one -------------------


def _scoped(store: Store, count: int = 1) -> None:
    """``count`` entries in each of no scope, team-a and team-b, the unscoped first."""
    epoch = store.epoch()
    for index in range(count):
        store.put(f"n{index}", b"n", 60, epoch, command=f"echo {index}")
        store.put(f"a{index}", b"aa", 60, epoch, command=f"echo {index}", scope="team-a")
        store.put(f"b{index}", b"bbb", 60, epoch, command=f"ls {index}", scope="team-b")


def test_entries_record_their_scope_and_a_listing_filters_by_it(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    _scoped(store)
    assert [(info.key, info.scope) for info in store.entries("", 0, 10)] == [
        ("b0", "team-b"),
        ("a0", "team-a"),
        ("n0", ""),
    ]
    assert [info.key for info in store.entries("", 0, 10, scope="team-a")] == ["a0"]
    assert [info.key for info in store.entries("", 0, 10, scope="")] == ["n0"]
    assert store.entries("", 0, 10, scope="team-c") == []
    assert store.entries("ls", 0, 10, scope="team-a") == []
    found = store.entry("a0")
    assert found is not None and found[0].scope == "team-a"


def test_delete_matching_by_scope_removes_that_scope_alone(store_factory: StoreFactory) -> None:
    store = store_factory()
    _scoped(store, count=2)
    assert store.delete_matching(any_command, scope="team-a") == 2
    assert store.delete_matching(any_command, scope="team-a") == 0
    assert sorted(info.key for info in store.entries("", 0, 10)) == ["b0", "b1", "n0", "n1"]
    stats = store.stats()
    assert (stats.size, stats.bytes, stats.evictions) == (4, 2 * 1 + 2 * 3, 0)
    assert store.get("a0") is None and store.get("n0") == b"n"


def test_a_scope_and_a_command_test_are_one_conjunction(store_factory: StoreFactory) -> None:
    store = store_factory()
    _scoped(store, count=2)
    assert store.delete_matching(lambda command: command == "echo 1", scope="team-a") == 1
    assert store.delete_matching(lambda command: command == "echo 1", scope="team-b") == 0
    assert store.delete_matching(lambda command: command == "echo 0", scope="") == 1
    assert sorted(info.key for info in store.entries("", 0, 10)) == ["a0", "b0", "b1", "n1"]


def test_a_scoped_entry_that_goes_leaves_its_scope(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    """Evicted, expired, deleted, cleared or stored again: a scope lists only what is live."""
    store = store_factory(max_entries=2)
    epoch = store.epoch()
    store.put("a", b"1", 60, epoch, command="echo a", scope="s")
    store.put("b", b"2", 5, epoch, command="echo b", scope="s")
    store.put("c", b"3", 60, epoch, command="echo c")  # evicts "a"
    assert [info.key for info in store.entries("", 0, 10, scope="s")] == ["b"]
    fake_clock.tick(6)
    assert store.get("b") is None  # expired, and taken away
    assert store.entries("", 0, 10, scope="s") == []
    assert store.delete_matching(any_command, scope="s") == 0
    store.put("d", b"4", 60, store.epoch(), command="echo d", scope="s")
    assert store.delete("d") and store.entries("", 0, 10, scope="s") == []
    store.put("e", b"5", 60, store.epoch(), command="echo e", scope="s")
    store.clear()
    assert store.entries("", 0, 10, scope="s") == []
    store.put("e", b"6", 60, store.epoch(), command="echo e", scope="s")
    assert [info.key for info in store.entries("", 0, 10, scope="s")] == ["e"]
    assert store.delete_matching(any_command, scope="s") == 1 and store.stats().size == 0


def test_a_scope_beyond_one_batch_is_listed_in_order_and_invalidated(
    store_factory: StoreFactory,
) -> None:
    """More entries of a scope than a shared store reads per step (``redis.BATCH``)."""
    store = store_factory(max_entries=3000)
    count = 600
    _scoped(store, count=count)
    listed = store.entries("", 550, 3, scope="team-b")
    assert [info.key for info in listed] == ["b49", "b48", "b47"]
    assert len(store.entries("", 0, 3 * count, scope="team-a")) == count
    assert store.delete_matching(any_command, scope="team-a") == count
    assert store.stats().size == 2 * count
    assert store.entries("", 0, 10, scope="team-a") == []


# -- stale answers: entries kept past expiry for readers that accept them ------------


def test_a_retained_entry_answers_a_stale_reader_and_counts_a_stale_hit(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(retain=60)
    store.put("k", b"old", ttl=10, epoch=store.epoch())
    assert store.get_stale("k", 5) == (b"old", False)  # live: an ordinary hit
    fake_clock.tick(12)
    assert store.get_stale("k", 5) == (b"old", True)
    assert store.get_stale("k", 60) == (b"old", True)
    stats = store.stats()
    assert (stats.hits, stats.stale_hits, stats.misses, stats.expirations) == (3, 2, 0, 0)
    assert stats.size == 1  # kept for stale readers, though nobody else sees it
    assert store.peek("k") is None and store.entry("k") is None
    assert store.entries("", 0, 10) == []


def test_a_reader_that_accepts_less_staleness_misses_and_leaves_the_entry(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(retain=60)
    store.put("k", b"old", ttl=10, epoch=store.epoch())
    fake_clock.tick(20)
    assert store.get_stale("k", 5) is None
    stats = store.stats()
    assert (stats.hits, stats.stale_hits, stats.misses, stats.expirations, stats.size) == (
        0,
        0,
        1,
        0,
        1,
    )
    assert store.get_stale("k", 60) == (b"old", True)  # still there for who accepts it


def test_an_ordinary_get_never_answers_a_stale_entry_nor_takes_it_from_stale_readers(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    """A request without ``stale`` that misses runs the command; a request with it,
    meanwhile, must still get the stale answer instead of waiting for that run."""
    store = store_factory(retain=60)
    store.put("k", b"old", ttl=10, epoch=store.epoch())
    fake_clock.tick(11)
    assert store.get("k") is None
    assert (store.stats().misses, store.stats().expirations) == (1, 0)
    assert store.get_stale("k", 30) == (b"old", True)
    fake_clock.tick(60)  # past retention: an ordinary get removes it, an expiration
    assert store.get("k") is None
    stats = store.stats()
    assert (stats.misses, stats.expirations, stats.size, stats.bytes) == (2, 1, 0, 0)
    assert store.get_stale("k", 1000) is None


def test_a_stale_entry_its_refresh_replaces_counts_one_expiration_a_live_one_none(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(retain=60)
    for key in ("live", "expired"):
        store.put(key, b"old", ttl=10 if key == "expired" else 100, epoch=store.epoch())
    fake_clock.tick(11)
    assert store.get_stale("expired", 30) == (b"old", True)  # its refresh stores anew:
    for key in ("live", "expired"):
        store.put(key, b"new", ttl=10, epoch=store.epoch())
    stats = store.stats()
    assert (stats.expirations, stats.evictions, stats.size, stats.bytes) == (1, 0, 2, 6)


def test_retention_ends_and_a_store_without_it_keeps_nothing_stale(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    kept, plain = store_factory(retain=30), store_factory()
    for store in (kept, plain):
        store.put("k", b"v", ttl=10, epoch=store.epoch())
    fake_clock.tick(15)
    assert plain.stats().size == 0  # purged at expiry, as ever
    assert plain.get_stale("k", 100) is None
    assert kept.stats().size == 1
    fake_clock.tick(30)  # past expiry plus retention
    stats = kept.stats()
    assert (stats.size, stats.bytes, stats.expirations) == (0, 0, 1)
    assert kept.get_stale("k", 1000) is None


def test_a_new_put_replaces_a_stale_entry_and_clear_resets_stale_hits(
    store_factory: StoreFactory, fake_clock: FakeClock
) -> None:
    store = store_factory(retain=60)
    store.put("k", b"old", ttl=10, epoch=store.epoch())
    fake_clock.tick(12)
    assert store.get_stale("k", 30) == (b"old", True)
    store.put("k", b"new", ttl=10, epoch=store.epoch())
    assert store.get_stale("k", 30) == (b"new", False)
    assert store.clear().stale_hits == 1
    assert store.stats().stale_hits == 0
