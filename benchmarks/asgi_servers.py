"""runcache's own app on uvicorn and on granian's ASGI interface: cache hits and a trivial route.

Run:  python3 benchmarks/asgi_servers.py [--seconds 3] [--rounds 3] [--connections 8]

Needs granian (``pip install granian``), which runcache itself does not.

- uvicorn: ``runcache serve``, as it serves (one process, uvloop, runcache's
  httptools protocol with its header and body deadlines).
- granian: ``python3 -m granian --interface asgi --factory --host 127.0.0.1
  --port P --workers 1 runcache.web.app:create_app``; ``create_app()`` builds the
  engine from the ``RUNCACHE_*`` environment (defaults here, logging at WARNING).

Both on free loopback ports, memory store. Each caches one command; then each
round sends, to one server and then the other, cached ``POST /api/command``
hits and then ``GET /livez`` over keep-alive connections. It prints each
server's median round (requests/s, p50, p99) per route and the ratio
granian / uvicorn for both routes. This is how runcache's server was chosen
(see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from _harness import Server, Service, free_port
from _loadgen import Load, load, median_load, ratio_line

HIT_BODY = json.dumps({"command": "echo asgi-benchmark"}).encode()

ROUTES = {"hits": ("POST", "/api/command", HIT_BODY), "livez": ("GET", "/livez", None)}


def granian() -> Service:
    port = free_port()
    return Service(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "runcache.web.app:create_app",
        ],
        port=port,
        env={"RUNCACHE_LOG_LEVEL": "WARNING"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    servers: dict[str, Service] = {"uvicorn": Server()}
    runs: dict[tuple[str, str], list[Load]] = {}
    try:
        servers["granian"] = granian()
        for server in servers.values():
            server.request("POST", "/api/command", json.loads(HIT_BODY))
            load(server, "POST", "/api/command", HIT_BODY, args.connections, 1.0)  # warm up
        for _ in range(args.rounds):
            for name, server in servers.items():
                for route, (method, path, body) in ROUTES.items():
                    runs.setdefault((name, route), []).append(
                        load(server, method, path, body, args.connections, args.seconds)
                    )
    finally:
        for server in servers.values():
            server.stop()

    print(
        f"runcache's app, memory store, {args.connections} connections, {args.rounds} rounds "
        f"of {args.seconds}s"
    )
    for route, (method, path, _) in ROUTES.items():
        for name in servers:
            print(f"{name:8} {method} {path:13} {median_load(runs[name, route]).describe()}")
        print(
            ratio_line(
                f"granian / uvicorn, {route}",
                median_load(runs["granian", route]),
                median_load(runs["uvicorn", route]),
            )
        )


if __name__ == "__main__":
    main()
