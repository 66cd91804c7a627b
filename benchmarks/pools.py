"""Worker pools: what a pool costs a run, what a second worker gives, how fast its output arrives.

Run:  python3 benchmarks/pools.py [--runs 100] [--jobs 8] [--megabytes 50] [--lines 100]

One throwaway ``redis-server``, one ``runcache serve`` and ``runcache worker``
processes of pool ``bench`` on it, all on loopback. In one run it measures:

- an uncached ``true`` (``"use_cache": false``) through a pool worker against the
  same request run by the server itself, alternating (p50, p99; goal: at most 2 ms
  more at p50);
- ``--jobs`` CPU-bound commands (``sha256sum`` of ``--megabytes`` MB of zeros) queued
  at once to a pool of one worker, then of two (each ``--concurrency 1``): the ratio
  of their wall times (goal 1.8x on this 2-core machine);
- the line-to-reader latency: a command on the worker prints the wall clock every
  20 ms; an SSE reader of ``/api/jobs/{id}/events`` on the server notes when each
  line arrives (p50, p99; goal p99 under 50 ms).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import Server, Service
from shared_jobs import PRINTER, percentiles
from store_hits import start_redis


class Worker(Service):
    """``runcache worker`` of a pool; ready once it prints that it serves it."""

    def __init__(self, store: str, pool: str, concurrency: int) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "runcache",
                "worker",
                "--pool",
                pool,
                "--store",
                store,
                "--concurrency",
                str(concurrency),
                "--log-level",
                "WARNING",
            ],
            announce="serving pool ",
        )

    def _wait_for_url(self, announce: str) -> int:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if announce in line:
                return 0
        raise SystemExit("runcache worker exited before joining its pool")


def timed(server: Server, body: dict[str, object]) -> float:
    started = time.perf_counter()
    answer = server.request("POST", "/api/command", body)
    if answer.get("return_code") != 0:
        raise SystemExit(f"run failed: {answer}")
    return time.perf_counter() - started


def overhead(server: Server, runs: int) -> tuple[list[float], list[float]]:
    """``true`` on the server and through the pool, alternating."""
    here, pooled = [], []
    for _ in range(runs):
        here.append(timed(server, {"command": "true", "use_cache": False}))
        pooled.append(timed(server, {"command": "true", "use_cache": False, "pool": "bench"}))
    return here, pooled


def hashing(server: Server, pool: str, jobs: int, megabytes: int) -> float:
    """Wall time of ``jobs`` hashing commands queued at once to ``pool``."""
    command = f"head -c {megabytes}M /dev/zero | sha256sum"
    started = time.perf_counter()

    def one(n: int) -> float:
        return timed(server, {"command": f"{command} # {n}", "use_cache": False, "pool": pool})

    with ThreadPoolExecutor(jobs) as executor:
        list(executor.map(one, range(jobs)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--lines", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        redis, port = start_redis(Path(directory))
        store = f"redis://127.0.0.1:{port}/0?namespace=bench-{uuid.uuid4().hex}"
        try:
            with Server(["--store", store]) as server, Worker(store, "bench", 1):
                here, pooled = overhead(server, args.runs)
                print(f"uncached true on the server     {percentiles(here)}")
                print(f"uncached true through the pool  {percentiles(pooled)}")
                extra = (statistics.median(pooled) - statistics.median(here)) * 1000
                print(f"pool overhead at p50: {extra:+.2f} ms (goal: at most +2 ms)")
                follow = follow_latency_pooled(server, args.lines)
                print(f"worker line -> SSE on server    {percentiles(follow)}  (goal p99 < 50 ms)")
                one = hashing(server, "bench", args.jobs, args.megabytes)
                with Worker(store, "bench", 1):
                    two = hashing(server, "bench", args.jobs, args.megabytes)
                print(
                    f"{args.jobs} x sha256 of {args.megabytes} MB: one worker {one:.2f} s, "
                    f"two {two:.2f} s: {one / two:.2f}x (goal 1.8x)"
                )
        finally:
            redis.terminate()
            redis.wait(10)


def follow_latency_pooled(server: Server, lines: int) -> list[float]:
    """Arrival on the server's SSE minus print time on the worker, for each line."""
    program = PRINTER.format(lines=lines)
    answer = server.request(
        "POST",
        "/api/command",
        {
            "command": f"{shlex.quote(sys.executable)} -c {shlex.quote(program)}",
            "background": True,
            "pool": "bench",
        },
    )
    connection = server.connection()
    connection.request("GET", f"/api/jobs/{answer['job_id']}/events")
    events = connection.getresponse()
    delays: list[float] = []
    while True:
        line = events.readline()
        if not line or line.startswith(b"event: result"):
            break
        if line.startswith(b"data: ") and line[6:].strip():
            arrived = time.time()
            try:
                delays.append(arrived - float(line[6:]))
            except ValueError:
                continue
    connection.close()
    return delays


if __name__ == "__main__":
    main()
