"""What containing a run costs: an uncached ``true`` through runcache, each way.

Run:  python3 benchmarks/spawn_cost.py [--runs 300] [--rounds 5]

Starts three ``runcache serve`` processes: ``--containment group`` (a process
group only: what runcache did before), ``--containment pidns`` (a PID namespace
per run, and the watchdog) and ``pidns`` with every per-run limit set (the
``prlimit`` wrapper), and, with ``--run-as USER`` (as root), a fourth running
commands as that user (the ``setpriv`` wrapper). It times ``POST /api/command`` of ``true`` with
``use_cache: false`` on one keep-alive connection to each, and a direct
``subprocess.Popen(["/bin/sh", "-c", "true"])`` with both streams piped, in
alternating rounds so the noise of a shared machine falls on all alike. Prints
median and p99 of each, the cost containment adds per run (median pidns minus
median group) and the ratios. Goal: containment adds < 0.5 ms a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable

from _harness import Server

LIMITS = (
    "--max-memory",
    "4G",
    "--max-cpu-seconds",
    "3600",
    "--max-file-size",
    "10G",
    "--max-open-files",
    "4096",
)


def direct() -> None:
    process = subprocess.Popen(
        ["/bin/sh", "-c", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    process.communicate()


def through(server: Server) -> Callable[[], None]:
    connection = server.connection()
    body = json.dumps({"command": "true", "use_cache": False}).encode()

    def call() -> None:
        connection.request(
            "POST", "/api/command", body=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(connection.getresponse().read())
        assert answer["success"] and not answer["cached"], answer

    return call


def timed(call: Callable[[], None], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="runs per round and way")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-as", default="", help="also time runs as this user")
    args = parser.parse_args()
    run_as = ["--run-as", args.run_as] if args.run_as else ["--containment", "pidns"]
    with (
        Server(["--containment", "group"]) as group,
        Server(["--containment", "pidns"]) as pidns,
        Server(["--containment", "pidns", *LIMITS]) as limited,
        Server(run_as) as other_user,
    ):
        ways = {
            "direct /bin/sh -c true (subprocess)": direct,
            "runcache, process group (before)": through(group),
            "runcache, PID namespace (after)": through(pidns),
            "runcache, PID namespace + limits": through(limited),
        }
        if args.run_as:
            ways["runcache, PID namespace + --run-as"] = through(other_user)
        for call in ways.values():  # warm up: the watchdog starts at the first run
            timed(call, 20)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, call in ways.items():
                times[name] += timed(call, args.runs)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.rounds} rounds of {args.runs} runs of each, alternating; ms per run")
    for name, values in times.items():
        print(f"  {name:<38} p50 {medians[name]:6.3f} ms  p99 {p99(values):6.3f} ms")
    base, before, after, limits = list(medians.values())[:4]
    added = after - before
    print(
        f"containment adds {added:+.3f} ms a run (p50 pidns - p50 group): "
        f"{'meets' if added < 0.5 else 'misses'} the goal of < 0.5 ms"
    )
    print(f"limits add {limits - after:+.3f} ms a run (the prlimit exec)")
    if args.run_as:
        other = medians["runcache, PID namespace + --run-as"]
        print(f"--run-as adds {other - after:+.3f} ms a run (the setpriv exec)")
    print(
        f"through runcache / direct spawn: before {before / base:.2f}, after {after / base:.2f}"
        f"; after / before {after / before:.3f}"
    )


if __name__ == "__main__":
    main()
