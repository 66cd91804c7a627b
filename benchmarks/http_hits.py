"""Cached hits over HTTP beside a trivial route, idle and while slow commands run.

Run:  python3 benchmarks/http_hits.py [--store URL] [--seconds 3] [--rounds 3]

Starts ``runcache serve`` on a free loopback port, warms one cached command,
then with 8 keep-alive connections measures requests/s, p50 and p99 of
``POST /api/command`` cache hits and of ``GET /livez`` (a route that does nothing)
on the same server in the same run, alternating the two over several rounds.
Then it starts 16 ``sleep 30`` commands and measures the hits again while they
run, and checks that 32 commands can run at once. It prints the ratios:
hits / trivial route (goal >= 0.70) and hits while busy / idle hits (goal >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from _harness import Load, Server, load, median_load, ratio_line

HIT_BODY = json.dumps({"command": "echo runcache-benchmark"}).encode()


def measure(server: Server, seconds: float, rounds: int) -> tuple[Load, Load]:
    hits: list[Load] = []
    trivial: list[Load] = []
    for _ in range(rounds):
        trivial.append(load(server, "GET", "/livez", None, 8, seconds))
        hits.append(load(server, "POST", "/api/command", HIT_BODY, 8, seconds))
    return median_load(hits), median_load(trivial)


def start_slow_commands(server: Server, count: int, tag: str) -> list[threading.Thread]:
    threads = [
        threading.Thread(
            target=server.request,
            args=("POST", "/api/command", {"command": f"sleep 30 # {tag} {n}",
                                           "use_cache": False}),
            daemon=True,
        )
        for n in range(count)
    ]
    for thread in threads:
        thread.start()
    wait_for_running(server, count)
    return threads


def wait_for_running(server: Server, count: int) -> None:
    deadline = time.monotonic() + 30
    while server.request("GET", "/health")["running_commands"] != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} commands did not start running together")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with Server(["--store", args.store]) as server:
        server.request("POST", "/api/cache/clear")
        server.request("POST", "/api/command", json.loads(HIT_BODY))
        load(server, "POST", "/api/command", HIT_BODY, 8, 1.0)  # warm up
        idle_hits, trivial = measure(server, args.seconds, args.rounds)
        start_slow_commands(server, 16, "busy")
        busy_hits = median_load(
            [load(server, "POST", "/api/command", HIT_BODY, 8, args.seconds)
             for _ in range(args.rounds)]
        )
        start_slow_commands(server, 16, "more")  # 32 running now
        print(f"store {args.store}, 8 connections, {args.rounds} rounds of {args.seconds}s")
        print(f"trivial route (GET /livez)      {trivial.describe()}")
        print(f"cache hits (POST /api/command)  {idle_hits.describe()}")
        print(f"hits while 16 commands run      {busy_hits.describe()}")
        print("32 commands ran at once: yes")
        print(ratio_line("hits / trivial route", idle_hits, trivial, 0.70))
        print(ratio_line("hits while busy / idle hits", busy_hits, idle_hits, 0.90))


if __name__ == "__main__":
    main()
