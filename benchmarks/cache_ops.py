"""ns per operation of the in-memory store beside cachetools.TTLCache, in the same run.

Run:  python3 benchmarks/cache_ops.py [--repeat 7]

For 1,000 and 100,000 entries: get of a present key (hit), get of an absent
key (miss), and set of a new key into a full cache (so each set evicts). Each
figure is the median of several timed batches of 20,000 calls; "max" is the
slowest batch.
``TTLCache`` is measured bare (no lock, no byte bound, no stats); MemoryStore
takes a lock, checks expiry, moves the entry and counts, and must still be at
least 2x faster on hits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from cachetools import TTLCache

from runcache.stores import MemoryStore

VALUE = b'{"stdout":"x"}'
BATCH = 20_000


def time_batches(operation: Callable[[int], object], repeat: int) -> list[float]:
    """ns per call for each of ``repeat`` batches of BATCH calls."""
    results = []
    for _ in range(repeat):
        began = time.perf_counter_ns()
        for i in range(BATCH):
            operation(i)
        results.append((time.perf_counter_ns() - began) / BATCH)
    return results


def runcache_ops(size: int) -> dict[str, Callable[[int], object]]:
    store = MemoryStore(size, 1 << 40)
    epoch = store.epoch()
    keys = [f"key-{i}" for i in range(size)]
    for key in keys:
        store.put(key, VALUE, 3600, epoch)
    counter = iter(range(10**12))
    return {
        "get-hit": lambda i: store.get(keys[i % size]),
        "get-miss": lambda i: store.get("absent"),
        "set-evict": lambda i: store.put(f"new-{next(counter)}", VALUE, 3600, epoch),
    }


def ttlcache_ops(size: int) -> dict[str, Callable[[int], object]]:
    cache: TTLCache[str, bytes] = TTLCache(size, 3600)
    keys = [f"key-{i}" for i in range(size)]
    for key in keys:
        cache[key] = VALUE
    counter = iter(range(10**12))

    def set_new(i: int) -> None:
        cache[f"new-{next(counter)}"] = VALUE

    return {
        "get-hit": lambda i: cache.get(keys[i % size]),
        "get-miss": lambda i: cache.get("absent"),
        "set-evict": set_new,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(
        f"{'entries':>8} {'operation':<10} {'runcache ns':>12} {'max':>7} "
        f"{'TTLCache ns':>12} {'max':>7} {'speed-up':>9}"
    )
    for size in (1_000, 100_000):
        ours, theirs = runcache_ops(size), ttlcache_ops(size)
        for name in ours:
            # Interleave the two so drift on a shared machine hits both alike.
            mine: list[float] = []
            other: list[float] = []
            for _ in range(args.repeat):
                mine += time_batches(ours[name], 1)
                other += time_batches(theirs[name], 1)
            speedup = statistics.median(other) / statistics.median(mine)
            print(
                f"{size:>8} {name:<10} {statistics.median(mine):>12.0f} {max(mine):>7.0f} "
                f"{statistics.median(other):>12.0f} {max(other):>7.0f} {speedup:>8.2f}x"
            )
    print("goal: get-hit at least 2.00x faster than TTLCache")


if __name__ == "__main__":
    main()
