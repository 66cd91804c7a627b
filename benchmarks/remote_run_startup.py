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
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

#: The way runcache runs today.
TODAY = "runcache run true (http.client)"

#: ``runcache run true`` from this interpreter, after ``{imports}``.
_RUN = "{imports}import sys; from runcache.cli import main; sys.argv[1:] = ['run', 'true']; main()"


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Milliseconds each of ``runs`` processes of ``argv`` took from spawn to exit, and the
    CPU (user + system) each used: on a busy machine the wall time waits for a core, the
    CPU time much less so."""
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_up(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no server at {url} after {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="processes per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode read, not compiled
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "runcache", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url)
        env["RUNCACHE_URL"] = url
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
    finally:
        server.terminate()
        server.wait(30)
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
