"""``runcache run`` of a cached command as a whole process, from start to exit.

Run:  python3 benchmarks/run_startup.py [--runs 30] [--rounds 3]

Times, as processes started and waited for one after the other: a direct
``/bin/true``; ``python -c pass`` (the interpreter's own floor); ``runcache run
true`` answered from the user's cache (a SQLite store under a temporary
``XDG_CACHE_HOME``, filled by one run first), which the light hit path answers
(``runcache.client.cached``); the same hit through the full CLI
(``runcache.cli.main``, as every run was answered before the light path); and
the same with ``--no-cache`` (what a miss costs, the command run each time).
Rounds alternate the ways so a shared machine's noise falls on all alike.
Prints median and p99 of each, in ms, the CPU each process used, and the ratio
of a cached ``runcache run`` to ``/bin/true``, to ``python -c pass`` and to the
full CLI's hit. Goal: a cached ``runcache run`` under 50 ms from start to exit.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The console script beside this Python (pip install -e . puts it there).
RUNCACHE = str(Path(sys.executable).with_name("runcache"))

#: ``runcache`` through the full CLI, never the light hit path: the hit as it was answered.
FULL_CLI = [sys.executable, "-c", "from runcache.cli import main; main()"]

#: The goal of issue 20: a cached answer, as a whole process, under this.
GOAL_MS = 50.0


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Milliseconds each of ``runs`` processes of ``argv`` took from spawn to exit, and
    the CPU (user + system) each used with what it started: on a busy machine the
    wall time waits for a core, the CPU time much less so."""
    times, cpu = [], []
    for _ in range(runs):
        before = _children_cpu()
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False)
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((_children_cpu() - before) * 1000)
        assert done.returncode == 0, argv
    return times, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="processes per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
        env["XDG_CACHE_HOME"] = cache
        # As installed: bytecode written once and read after, not each module compiled
        # at every start (a test environment may turn writing it off).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        ways = {
            "/bin/true": ["/bin/true"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "runcache run true (cached)": [RUNCACHE, "run", "true"],
            "full CLI run true (cached)": [*FULL_CLI, "run", "true"],
            "runcache run --no-cache true": [RUNCACHE, "run", "--no-cache", "true"],
        }
        for argv in ways.values():  # warm up: the store is filled, the page cache too
            timed(argv, env, 2)
        times: dict[str, list[float]] = {name: [] for name in ways}
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, argv in ways.items():
                wall, used = timed(argv, env, args.runs)
                times[name] += wall
                cpu[name] += used
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.rounds} rounds of {args.runs} processes of each, alternating; ms start to exit")
    for name, values in times.items():
        print(
            f"  {name:<30} p50 {medians[name]:8.2f} ms  p99 {p99(values):8.2f} ms"
            f"  CPU p50 {statistics.median(cpu[name]):7.2f} ms"
        )
    cached = medians["runcache run true (cached)"]
    print(
        f"cached runcache run / /bin/true: {cached / medians['/bin/true']:.1f}; "
        f"/ python -c pass: {cached / medians['python -c pass']:.1f}; "
        f"/ the full CLI's hit: {cached / medians['full CLI run true (cached)']:.2f}; "
        f"p50 {cached:.1f} ms {'meets' if cached < GOAL_MS else 'misses'} the goal of "
        f"< {GOAL_MS:.0f} ms"
    )


if __name__ == "__main__":
    main()
