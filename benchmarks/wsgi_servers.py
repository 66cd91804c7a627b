"""The same runcache app on waitress and on granian: cache hits and a trivial route.

Run:  python3 benchmarks/wsgi_servers.py [--seconds 3] [--rounds 3]

Needs granian (``pip install granian``), which runcache itself does not. Both
servers run one process of ``runcache.app:create_app`` on a free loopback port
with 64 threads; 8 keep-alive connections send cached ``POST /api/command`` hits,
then ``GET /livez``, alternating servers round by round. It prints each server's
requests/s and the ratio granian / waitress for both routes. This is how
runcache's server was chosen (see the README).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

from _harness import Load, Server, load, median_load

HIT_BODY = json.dumps({"command": "echo wsgi-benchmark"}).encode()


class GranianServer(Server):
    """granian's WSGI interface, one worker, serving the app factory."""

    def __init__(self, threads: int) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--blocking-threads", str(threads), "--log-level", "warning",
             "runcache.app:create_app"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("granian did not start") from None
                time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers: dict[str, Server] = {
        "waitress": Server(["--threads", "64"]),
        "granian": GranianServer(64),
    }
    results: dict[tuple[str, str], list[Load]] = {}
    try:
        for server in servers.values():
            server.request("POST", "/api/command", json.loads(HIT_BODY))
            load(server, "POST", "/api/command", HIT_BODY, 8, 1.0)
        for _ in range(args.rounds):
            for name, server in servers.items():
                results.setdefault((name, "hits"), []).append(
                    load(server, "POST", "/api/command", HIT_BODY, 8, args.seconds))
                results.setdefault((name, "livez"), []).append(
                    load(server, "GET", "/livez", None, 8, args.seconds))
    finally:
        for server in servers.values():
            server.stop()
    for route in ("hits", "livez"):
        for name in servers:
            print(f"{name:<9} {route:<6} {median_load(results[name, route]).describe()}")
        ratio = (median_load(results["granian", route]).per_second
                 / median_load(results["waitress", route]).per_second)
        print(f"granian / waitress, {route}: {ratio:.2f}")


if __name__ == "__main__":
    main()
