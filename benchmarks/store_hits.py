"""Cached hits over HTTP through each store, beside the in-memory store, in one run.

Run:  python3 benchmarks/store_hits.py [--seconds 3] [--rounds 3] [--connections 8]

Starts a throwaway ``redis-server`` on a free loopback port (no persistence),
a SQLite file in a temporary directory, and one ``runcache serve`` per setup:
memory://, sqlite://, redis:// and redis:// with ``--workers 2`` (two server
processes on one port sharing one namespace; the two Redis setups use
different namespaces of the same ``redis-server``). Each server caches one
command; then the rounds alternate between the setups
(memory, sqlite, redis, redis x2, memory, ...), each round sending
``POST /api/command`` hits over keep-alive connections for a fixed time. It
prints, per setup, the median round's requests/s, p50 and p99, the server's
CPU time per hit over all its rounds (its processes' user + system time, which
the noise of the machine moves less than requests/s), the ratio of
SQLite's and Redis's hits to the in-memory store's (goals >= 0.6 and >= 0.7), and the
ratio of Redis with 2 workers to Redis with 1 (on 2 cores the load generator
and redis-server take their share: the ratio says what a second worker adds
here, not what it would on a bigger machine). The workers share one listening
socket, so how the connections split between them is up to the kernel and
varies from round to round: halfway through each 2-worker round it counts the
connections each worker holds (psutil) and prints the splits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _harness import Server, free_port
from _loadgen import Load, load, median_load, ratio_line

HIT_BODY = json.dumps({"command": "echo runcache-store-benchmark"}).encode()


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def connections_per_worker(server: Server) -> list[int]:
    """Established connections to the server's port held by each of its worker processes."""
    counts = []
    for worker in psutil.Process(server.process.pid).children():
        connections = worker.net_connections("tcp")
        counts.append(
            sum(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
                for c in connections
            )
        )
    return sorted(counts)


def cpu_seconds(server: Server) -> float:
    """User + system CPU time of the server's process and its workers so far."""
    process = psutil.Process(server.process.pid)
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        times = each.cpu_times()
        total += times.user + times.system
    return total


def load_counting_split(
    server: Server, connections: int, seconds: float, splits: list[list[int]]
) -> Load:
    """``load`` of hits, with the connections per worker counted halfway through."""
    timer = threading.Timer(
        seconds / 2 + 0.5, lambda: splits.append(connections_per_worker(server))
    )
    timer.start()
    try:
        return load(server, "POST", "/api/command", HIT_BODY, connections, seconds)
    finally:
        timer.join(seconds + 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        redis_process, port = start_redis(Path(directory))
        redis = f"redis://127.0.0.1:{port}/0?namespace="
        setups = {
            "memory": ["--store", "memory://"],
            "sqlite": ["--store", f"sqlite://{directory}/bench.db"],
            "redis": ["--store", redis + "bench1"],
            "redis x2": ["--store", redis + "bench2", "--workers", "2"],
        }
        servers: dict[str, Server] = {}
        try:
            for name, args_of_setup in setups.items():
                servers[name] = Server(args_of_setup)
            runs: dict[str, list[Load]] = {name: [] for name in setups}
            for server in servers.values():
                server.request("POST", "/api/cache/clear")
                server.request("POST", "/api/command", json.loads(HIT_BODY))
                load(server, "POST", "/api/command", HIT_BODY, args.connections, 1.0)  # warm up
            splits: list[list[int]] = []
            cpu = dict.fromkeys(setups, 0.0)
            for _ in range(args.rounds):
                for name, server in servers.items():
                    before = cpu_seconds(server)
                    if name == "redis x2":
                        runs[name].append(
                            load_counting_split(server, args.connections, args.seconds, splits)
                        )
                    else:
                        runs[name].append(
                            load(
                                server,
                                "POST",
                                "/api/command",
                                HIT_BODY,
                                args.connections,
                                args.seconds,
                            )
                        )
                    cpu[name] += cpu_seconds(server) - before
            hits = {name: median_load(loads) for name, loads in runs.items()}
        finally:
            for server in servers.values():
                server.stop()
            redis_process.terminate()
            redis_process.wait(10)

    print(
        f"cache hits (POST /api/command), {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds}s per setup"
    )
    for name, setup in setups.items():
        scheme = setup[1].split("://")[0]
        per_hit = cpu[name] / sum(run.requests for run in runs[name])
        print(
            f"{name:8} {hits[name].describe()}  CPU {per_hit * 1e6:4.0f} µs/hit   "
            f"({' '.join([scheme + '://', *setup[2:]])})"
        )
    for name, goal in (("sqlite", 0.6), ("redis", 0.7)):
        print(ratio_line(f"{name} hits / memory hits", hits[name], hits["memory"], goal))
    print(ratio_line("redis 2 workers / redis 1 worker", hits["redis x2"], hits["redis"]))
    print(
        "connections per worker in each 2-worker round: "
        + ", ".join("+".join(map(str, split)) for split in splits)
        + "; req/s in those rounds: "
        + ", ".join(f"{run.per_second:.0f}" for run in runs["redis x2"])
    )


if __name__ == "__main__":
    main()
