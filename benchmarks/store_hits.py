"""Cached hits over HTTP through each store, beside the in-memory store, in one run.

Run:  python3 benchmarks/store_hits.py [--seconds 3] [--rounds 3] [--connections 8]

Starts a throwaway ``redis-server`` on a free loopback port (no persistence),
a SQLite file in a temporary directory, and one ``runcache serve`` per store
(memory://, sqlite://, redis://). Each server caches one command; then the
rounds alternate between the stores (memory, sqlite, redis, memory, ...), each
round sending ``POST /api/command`` hits over keep-alive connections for a
fixed time. It prints, per store, the median round's requests/s, p50 and p99,
and the ratio of each store's hits to the in-memory store's (goal >= 0.50).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from _harness import Load, Server, load, median_load, ratio_line

HIT_BODY = json.dumps({"command": "echo runcache-store-benchmark"}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        redis_process, port = start_redis(Path(directory))
        stores = {
            "memory": "memory://",
            "sqlite": f"sqlite://{directory}/bench.db",
            "redis": f"redis://127.0.0.1:{port}/0?namespace=bench",
        }
        servers = {name: Server(["--store", url]) for name, url in stores.items()}
        try:
            runs: dict[str, list[Load]] = {name: [] for name in stores}
            for server in servers.values():
                server.request("POST", "/api/cache/clear")
                server.request("POST", "/api/command", json.loads(HIT_BODY))
                load(server, "POST", "/api/command", HIT_BODY, args.connections, 1.0)  # warm up
            for _ in range(args.rounds):
                for name, server in servers.items():
                    runs[name].append(load(server, "POST", "/api/command", HIT_BODY,
                                           args.connections, args.seconds))
            hits = {name: median_load(loads) for name, loads in runs.items()}
        finally:
            for server in servers.values():
                server.stop()
            redis_process.terminate()
            redis_process.wait(10)

    print(f"cache hits (POST /api/command), {args.connections} connections, "
          f"{args.rounds} rounds of {args.seconds}s per store")
    for name, url in stores.items():
        print(f"{name:7} {hits[name].describe()}   ({url.split('?')[0].split('://')[0]}://)")
    for name in ("sqlite", "redis"):
        print(ratio_line(f"{name} hits / memory hits", hits[name], hits["memory"], 0.50))


if __name__ == "__main__":
    main()
