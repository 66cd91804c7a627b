"""What ``runcache run`` against a server would pay to speak HTTP through httpx.

Run:  python3 benchmarks/remote_run_startup.py [--runs 20] [--rounds 3]

Starts ``runcache serve`` on a free loopback port, fills its cache with ``true``,
then times, as processes started and waited for one after the other, ``runcache
run true`` with ``RUNCACHE_URL`` set (a remote hit: one request on the standard
library's ``http.client``), and the very same process with httpx imported first
(and with httpx2, the fork the MCP SDK brings): what a client on either would add
before its first byte is sent. A remote hit sends one request, so nothing a
library does after its import (pooled connections, say) can win that time back.
Rounds alternate the ways so a shared machine's noise falls on all alike. Prints
median and p99 of each, in ms, and the ratio of each to today's ``runcache run``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from _harness import Server
from run_startup import p99, timed

#: The way runcache runs today.
TODAY = "runcache run true (http.client)"

#: ``runcache run true`` from this interpreter, after ``{imports}``.
_RUN = "{imports}import sys; from runcache.cli import main; sys.argv[1:] = ['run', 'true']; main()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="processes per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode read, not compiled
    with Server() as server:
        env["RUNCACHE_URL"] = server.url
        ways = {
            TODAY: [sys.executable, "-c", _RUN.format(imports="")],
            "the same, httpx imported": [
                sys.executable,
                "-c",
                _RUN.format(imports="import httpx; "),
            ],
            "the same, httpx2 imported": [
                sys.executable,
                "-c",
                _RUN.format(imports="import httpx2; "),
            ],
        }
        for argv in ways.values():  # warm up: the cache is filled, the page cache too
            timed(argv, env, 2)
        times: dict[str, list[float]] = {name: [] for name in ways}
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, argv in ways.items():
                wall, used = timed(argv, env, args.runs)
                times[name] += wall
                cpu[name] += used
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"{args.rounds} rounds of {args.runs} remote hits of each, alternating; ms start to exit")
    for name, values in times.items():
        print(
            f"  {name:<34} p50 {medians[name]:8.2f} ms  p99 {p99(values):8.2f} ms"
            f"  CPU p50 {cpu_medians[name]:7.2f} ms"
        )
    today, today_cpu = medians[TODAY], cpu_medians[TODAY]
    for name in list(ways)[1:]:
        print(
            f"{name} / today: {medians[name] / today:.2f} (+{medians[name] - today:.0f} ms), "
            f"CPU {cpu_medians[name] / today_cpu:.2f} (+{cpu_medians[name] - today_cpu:.0f} ms)"
        )


if __name__ == "__main__":
    main()
