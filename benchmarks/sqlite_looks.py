"""What the SQLite store's look at its file costs a hit: never, as set, or on every call.

Run:  python3 benchmarks/sqlite_looks.py [--rounds 15] [--hits 10000]

Before each call the store may look whether its file was deleted or replaced, or
its ``-shm`` truncated (two ``stat`` calls), at most every ``LOOK_INTERVAL``
seconds per thread. This times ``SqliteStore.get`` hits in one process on three
stores, each on a file of its own in a temporary directory: one that never looks
(an interval of an hour), one at the default interval, one that looks on every
call; rounds alternate between them. It prints each one's median and p99 of the
rounds' µs per hit, and the ratios to the store that never looks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from runcache.stores.sqlite import LOOK_INTERVAL, SqliteStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--hits", type=int, default=10_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        intervals = {
            "never": 3600.0,
            f"every {LOOK_INTERVAL * 1000:g} ms": LOOK_INTERVAL,
            "every call": 0.0,
        }
        stores = {
            name: SqliteStore(
                Path(directory) / f"{index}.db", 1000, 1 << 24, look_interval=interval
            )
            for index, (name, interval) in enumerate(intervals.items())
        }
        for store in stores.values():
            store.put("k", b"x" * 2000, 3600, store.epoch())
        rounds: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(options.rounds):
            for name, store in stores.items():
                start = time.perf_counter()
                for _ in range(options.hits):
                    store.get("k")
                rounds[name].append((time.perf_counter() - start) / options.hits * 1e6)
        for store in stores.values():
            store.close()
    never = statistics.median(rounds["never"])
    for name, times in rounds.items():
        times.sort()
        p99 = times[min(len(times) - 1, round(len(times) * 0.99))]
        median = statistics.median(times)
        print(
            f"looks {name:13s} median {median:6.2f} µs/hit  p99 {p99:6.2f}"
            f"  / never: {median / never:.3f}"
        )


if __name__ == "__main__":
    main()
