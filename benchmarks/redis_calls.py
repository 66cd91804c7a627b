"""Redis hits from the event loop: the store's calls in a thread pool, or redis.asyncio.

Run:  python3 benchmarks/redis_calls.py [--seconds 3] [--rounds 3] [--concurrency 64]

The engine awaits store calls on its event loop. For Redis there are two ways:
hand the blocking redis-py call to a small thread pool (what ``Cache`` does for
every blocking store), or speak ``redis.asyncio`` on the loop itself. This
measures both on one throwaway ``redis-server`` (started on a free loopback
port): ``concurrency`` coroutines each doing cache hits back to back, the same
Lua script (the store's own ``get``) either way, rounds alternating. It prints
hits/s, p50 and p99 per way, and the ratio asyncio / threads.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

import redis.asyncio

from runcache.engine.cache import Cache
from runcache.stores import open_store
from runcache.stores.redis import _GET, RedisStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def hammer(
    hit: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while (began := time.perf_counter()) < stop_at:
            assert await hit() is not None
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


def describe(name: str, rate: float, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1e3
    p99 = ordered[int(len(ordered) * 0.99)] * 1e3
    return f"{name:<16} {rate:8.0f} hits/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"


async def main(seconds: float, rounds: int, concurrency: int, url: str) -> None:
    store = open_store(url, 1000, 1 << 20)
    assert isinstance(store, RedisStore)
    cache = Cache(store)
    key = "0" * 64
    store.put(key, b'{"stdout":"x"}', 3600, store.epoch())
    keys = list(store._entry_keys(key))
    connection = redis.asyncio.Redis.from_url(url.split("?")[0], max_connections=concurrency)
    script = connection.register_script(_GET)

    async def thread_hit() -> object:
        return await cache.lookup(key)

    async def asyncio_hit() -> object:
        return await script(keys=keys, args=[key, repr(time.time())])

    results: dict[str, list[tuple[float, list[float]]]] = {"threads (8)": [], "redis.asyncio": []}
    for _ in range(rounds):
        results["threads (8)"].append(await hammer(thread_hit, concurrency, seconds))
        results["redis.asyncio"].append(await hammer(asyncio_hit, concurrency, seconds))
    medians = {}
    for name, runs in results.items():
        rate, latencies = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        medians[name] = rate
        print(describe(name, rate, latencies))
    print(f"redis.asyncio / threads: {medians['redis.asyncio'] / medians['threads (8)']:.2f}")
    print(
        f"(median of {rounds} rounds of {seconds:g}s, {concurrency} coroutines; "
        f"stdev of thread rounds {statistics.pstdev(r for r, _ in results['threads (8)']):.0f})"
    )
    await connection.aclose()
    cache.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    options = parser.parse_args()
    port = free_port()
    server_binary = shutil.which("redis-server")
    if server_binary is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [
                server_binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            asyncio.run(
                main(
                    options.seconds,
                    options.rounds,
                    options.concurrency,
                    f"redis://127.0.0.1:{port}/0?namespace=bench",
                )
            )
        finally:
            server.terminate()
            server.wait(10)
