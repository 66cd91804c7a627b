"""Cached hits over HTTP against a bare Flask route, idle and while 64 slow commands run.

Run:  python3 benchmarks/http_hits.py [--store URL] [--seconds 3] [--rounds 3] [--connections 8]

Needs Flask (``pip install flask``), which runcache itself does not.

Starts ``runcache serve --max-concurrent 64`` and, beside it, a bare Flask
route on werkzeug's threaded server (``benchmarks/_toy_routes.py flask``: the
stack of the API runcache stands in for; it decodes the JSON body, looks the
command up in a dict and returns the stored JSON bytes; access log off, as
runcache's). Both on free loopback ports; the load comes from
``_harness.load`` over keep-alive connections. runcache caches one command,
then each round measures, in this order:

1. runcache's hits (``POST /api/command``) while 64 distinct ``sleep`` commands
   (``use_cache`` false) run: started just before, checked running through
   ``/health`` before and after the burst, long enough to outlast it;
2. the Flask route;
3. runcache's ``GET /livez`` (a route that does nothing), while the slow
   commands end;
4. runcache's hits once ``/health`` says no command runs.

It prints the median round of each (requests/s, p50, p99, errors) and the
ratios: hits / Flask route (goal >= 5) and hits while 64 commands run / idle
hits (goal >= 0.9), with the p99 of both, and whether runcache counted as many
hits as the generator received.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from _harness import Server, Service
from _loadgen import Load, load, median_load, ratio_line
from _toy_routes import COMMAND

HIT_BODY = json.dumps({"command": COMMAND}).encode()
TOYS = Path(__file__).with_name("_toy_routes.py")

#: Slow commands running during the busy rounds, and the slots runcache gets for them.
SLOW = 64

#: Seconds a slow command outlives the burst it is there for.
SLOW_MARGIN = 5.0


class SlowCommands:
    """``SLOW`` distinct uncached ``sleep`` requests, each waited on by a thread of its own."""

    def __init__(self, server: Server, seconds: float, tag: str) -> None:
        self.server = server
        self.answers: list[dict[str, object]] = []
        self.threads = [
            threading.Thread(target=self._ask, daemon=True, args=(
                {"command": f"sleep {seconds:.1f} # {tag} {n}", "use_cache": False},
                seconds + 60,
            ))
            for n in range(SLOW)
        ]
        for thread in self.threads:
            thread.start()

    def _ask(self, body: dict[str, object], timeout: float) -> None:
        self.answers.append(self.server.request("POST", "/api/command", body, timeout=timeout))

    def succeeded(self) -> int:
        """How many ended with return code 0, once all have answered (or timed out)."""
        for thread in self.threads:
            thread.join(120)
        return sum(answer.get("return_code") == 0 for answer in self.answers)


def running(server: Server) -> int:
    count = server.request("GET", "/health", timeout=30)["running_commands"]
    assert isinstance(count, int)
    return count


def wait_for_running(server: Server, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while running(server) != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"/health never said {count} commands run (now {running(server)})")
        time.sleep(0.05)


def hits_counted(server: Server) -> int:
    stats = server.request("GET", "/api/cache/stats", timeout=30)
    assert isinstance(stats["hits"], int)
    return stats["hits"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    seconds, connections = args.seconds, args.connections
    runs: dict[str, list[Load]] = {"busy": [], "flask": [], "livez": [], "idle": []}
    busy_throughout = True
    slow_ok = 0

    with Server(["--store", args.store, "--max-concurrent", str(SLOW)]) as server, \
            Service([sys.executable, str(TOYS), "flask"]) as flask:
        server.request("POST", "/api/cache/clear")
        server.request("POST", "/api/command", json.loads(HIT_BODY))
        load(flask, "POST", "/api/command", HIT_BODY, connections, 1.0)  # warm up
        load(server, "POST", "/api/command", HIT_BODY, connections, 1.0)
        counted_before = hits_counted(server)
        for round_number in range(args.rounds):
            slow = SlowCommands(server, seconds + SLOW_MARGIN, f"round {round_number}")
            wait_for_running(server, SLOW, 30)
            runs["busy"].append(load(server, "POST", "/api/command", HIT_BODY, connections,
                                     seconds))
            busy_throughout &= running(server) == SLOW
            runs["flask"].append(load(flask, "POST", "/api/command", HIT_BODY, connections,
                                      seconds))
            runs["livez"].append(load(server, "GET", "/livez", None, connections, seconds))
            wait_for_running(server, 0, seconds + SLOW_MARGIN + 30)
            slow_ok += slow.succeeded()
            runs["idle"].append(load(server, "POST", "/api/command", HIT_BODY, connections,
                                     seconds))
        counted = hits_counted(server) - counted_before
    sent = sum(run.requests - run.errors for name in ("busy", "idle") for run in runs[name])
    medians = {name: median_load(loads) for name, loads in runs.items()}

    print(f"store {args.store}, {connections} connections, {args.rounds} rounds of {seconds}s, "
          f"--max-concurrent {SLOW}")
    print(f"Flask route (werkzeug, threaded)    {medians['flask'].describe()}")
    print(f"runcache GET /livez                 {medians['livez'].describe()}")
    print(f"runcache hits, idle                 {medians['idle'].describe()}")
    print(f"runcache hits, {SLOW} commands running  {medians['busy'].describe()}")
    print(f"{SLOW} commands ran throughout each busy burst: {'yes' if busy_throughout else 'NO'}; "
          f"{slow_ok} of {SLOW * args.rounds} ended with return code 0")
    print(f"hits runcache counted: {counted}; 200 answers the generator got: {sent}")
    print(ratio_line("hits / Flask route", medians["idle"], medians["flask"], 5.0))
    print(ratio_line(f"hits while {SLOW} commands run / idle hits", medians["busy"],
                     medians["idle"], 0.9))
    print(f"p99 of hits: idle {medians['idle'].percentile(0.99) * 1e3:.2f} ms, "
          f"while {SLOW} commands run {medians['busy'].percentile(0.99) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
