"""Cached hits over HTTP against a bare Flask route, idle and while 64 slow commands run;
and hits with /metrics counting (and the audit log on) beside both off.

Run:  python3 benchmarks/http_hits.py [--store URL] [--seconds 3] [--rounds 3] [--connections 8]
      python3 benchmarks/http_hits.py --metrics-only [--store URL --workers N] [--rounds 5]
      python3 benchmarks/http_hits.py --stale-only [--store URL]

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

Then (the only part with ``--metrics-only``) what counting costs a hit:
servers side by side, one as shipped (Prometheus metrics always count) with
``--audit-log`` writing to a temporary file, one as shipped without it, and one
with both off (metrics off through ``RUNCACHE_BENCHMARK_NO_METRICS``, an
environment variable only this benchmark sets: the engine then gets metrics
that count nothing and the app no request timer).
Rounds rotate which server goes first; it prints the median round of each, the
ratios to off (goal >= 0.85), whether ``/metrics`` counted every hit the
generator got, and the cost of the metrics calls a hit makes, timed in this
process in prometheus_client's single-process and multiprocess (``--workers
N``) modes.

Last (the only part with ``--stale-only``), stale answers beside fresh hits on
one server: a result whose refresh runs throughout (its command sleeps when
run again), asked with ``"stale": 3600`` and answered stale every time, against
an ordinary hit and a live hit asked with ``stale`` too, in rotated rounds; it
prints each median and the ratios (goal: a stale answer costs about what a hit
does, >= 0.85 of a fresh hit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _harness import Server, Service
from _loadgen import Load, load, median_load, ratio_line
from _toy_routes import COMMAND
from runcache.engine.metrics import MULTIPROC_ENV, Metrics

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
            threading.Thread(
                target=self._ask,
                daemon=True,
                args=(
                    {"command": f"sleep {seconds:.1f} # {tag} {n}", "use_cache": False},
                    seconds + 60,
                ),
            )
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


#: The environment variable (read by runcache.engine.metrics) that turns the metrics off, for
#: this comparison only.
METRICS_OFF_ENV = "RUNCACHE_BENCHMARK_NO_METRICS"


class RuncacheService(Service):
    """``runcache serve`` as the harness's Server starts it, with an environment of its own."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "runcache",
                "serve",
                "--port",
                "0",
                "--log-level",
                "WARNING",
                *args,
            ],
            announce="runcache listening on ",
            env=env,
        )

    def metrics_text(self) -> str:
        connection = self.connection(timeout=30)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()


def counted_hits(server: RuncacheService) -> float:
    for line in server.metrics_text().splitlines():
        if line.startswith("runcache_cache_hits_total "):
            return float(line.split()[1])
    raise SystemExit("/metrics has no runcache_cache_hits_total")


def cpu_seconds(server: Service) -> float:
    """User + system CPU time of a server's process and its workers so far: steadier than
    requests a second on a machine that others load too."""
    process = psutil.Process(server.process.pid)
    return sum(sum(each.cpu_times()[:2]) for each in (process, *process.children(True)))


def metrics_call_costs() -> str:
    """The metrics calls one hit makes (a hit counted, a request timed), in microseconds,
    in one process and in multiprocess mode (each increment written to an mmapped file)."""

    def per_hit(metrics: Metrics) -> float:
        calls, best = 100_000, float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                metrics.hit()
                metrics.request(("/api/command", "POST", "200"), 0.0004)
            best = min(best, (time.perf_counter() - start) / calls)
        return best * 1e6

    single = per_hit(Metrics())
    saved = os.environ.get(MULTIPROC_ENV)
    with tempfile.TemporaryDirectory() as directory:
        multi = per_hit(Metrics(directory))
    # Metrics(directory) names the directory in this process's environment, which the
    # servers started after this would inherit (and fail on, the directory gone).
    if saved is None:
        os.environ.pop(MULTIPROC_ENV, None)
    else:
        os.environ[MULTIPROC_ENV] = saved
    return (
        f"metrics calls per hit, timed in process: {single:.2f} µs (one process), "
        f"{multi:.2f} µs (multiprocess mode, --workers N)"
    )


def compare_metrics(args: argparse.Namespace) -> None:
    """Hits with metrics counting and the audit log on, with metrics alone, and with both
    off: servers side by side, each round in a rotated order."""
    seconds, connections = args.seconds, args.connections
    common = ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        audit = ["--audit-log", os.path.join(scratch, "audit.log")]
        base = {
            name: value for name, value in os.environ.items() if not name.startswith("RUNCACHE_")
        }
        setups = {
            "on": (audit, base),
            "metrics": ([], base),
            "off": ([], {**base, METRICS_OFF_ENV: "1"}),
        }
        servers: dict[str, RuncacheService] = {}
        for name, (flags, env) in setups.items():
            servers[name] = stack.enter_context(
                RuncacheService(
                    [*common, "--store", _store_of(args.store, name, scratch), *flags], env
                )
            )
        for server in servers.values():
            server.request("POST", "/api/command", json.loads(HIT_BODY))
            load(server, "POST", "/api/command", HIT_BODY, connections, 1.0)  # warm up
        counted_before = counted_hits(servers["on"])
        runs: dict[str, list[Load]] = {name: [] for name in servers}
        cpu = dict.fromkeys(servers, 0.0)
        names = list(servers)
        for round_number in range(args.rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                before = cpu_seconds(servers[name])
                runs[name].append(
                    load(servers[name], "POST", "/api/command", HIT_BODY, connections, seconds)
                )
                cpu[name] += cpu_seconds(servers[name]) - before
        counted = counted_hits(servers["on"]) - counted_before
    sent = sum(run.requests - run.errors for run in runs["on"])
    medians = {name: median_load(loads) for name, loads in runs.items()}
    per_hit = {name: cpu[name] / sum(run.requests for run in runs[name]) * 1e6 for name in runs}
    what = "/metrics counting and --audit-log"
    print(
        f"store {args.store}, --workers {args.workers}, {connections} connections, "
        f"{args.rounds} rounds of {seconds}s, order rotated each round; server CPU per hit "
        "over all rounds"
    )
    print(f"hits, {what:<36} {medians['on'].describe()}  CPU {per_hit['on']:4.0f} µs/hit")
    print(
        f"hits, {'/metrics counting alone':<36} {medians['metrics'].describe()}  "
        f"CPU {per_hit['metrics']:4.0f} µs/hit"
    )
    print(f"hits, {'both off':<36} {medians['off'].describe()}  CPU {per_hit['off']:4.0f} µs/hit")
    print(f"hits /metrics counted: {counted:.0f}; 200 answers the generator got: {sent}")
    print(ratio_line(f"hits with {what} / off", medians["on"], medians["off"], 0.85))
    print(
        ratio_line(
            "hits with /metrics counting alone / off", medians["metrics"], medians["off"], 0.85
        )
    )
    print(metrics_call_costs())


#: The stale benchmark's command: quick the first time, then a refresh that outlasts the run.
STALE_COMMAND = "test -e {flag} && sleep 600; echo stale-benchmark"
FRESH_BODY = json.dumps({"command": COMMAND, "stale": 3600}).encode()


def compare_stale(args: argparse.Namespace) -> None:
    """Stale answers (their refresh running throughout) beside fresh hits, in rotated rounds."""
    with (
        tempfile.TemporaryDirectory() as scratch,
        Server(["--store", _store_of(args.store, "stale", scratch)]) as server,
    ):
        flag = Path(scratch) / "refreshing"
        command = STALE_COMMAND.format(flag=flag)
        stale_body = json.dumps({"command": command, "stale": 3600}).encode()
        server.request("POST", "/api/command", json.loads(HIT_BODY))
        server.request("POST", "/api/command", {"command": command, "ttl": 0.2})
        flag.touch()  # from now on a run of it sleeps: its refresh outlasts the benchmark
        deadline = time.monotonic() + 10
        while not server.request("POST", "/api/command", json.loads(stale_body)).get("stale"):
            assert time.monotonic() < deadline, "the result never went stale"
            time.sleep(0.05)  # until the ttl of 0.2 s has passed
        bodies = {"stale answer": stale_body, "hit": HIT_BODY, "hit asked with stale": FRESH_BODY}
        for body in bodies.values():
            load(server, "POST", "/api/command", body, args.connections, 1.0)  # warm up
        runs: dict[str, list[Load]] = {name: [] for name in bodies}
        names = list(bodies)
        for round_number in range(args.rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(
                    load(
                        server, "POST", "/api/command", bodies[name], args.connections, args.seconds
                    )
                )
        last = server.request("POST", "/api/command", json.loads(stale_body))
        stale_hits = server.request("GET", "/api/cache/stats")["stale_hits"]
    medians = {name: median_load(loads) for name, loads in runs.items()}
    print(
        f"store {args.store}, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s, order rotated each round; one refresh ran throughout"
    )
    for name, median in medians.items():
        print(f"{name:<36} {median.describe()}")
    sent = sum(run.requests - run.errors for run in runs["stale answer"])
    print(
        f"still stale at the end: {'yes' if last.get('stale') else 'NO'}; stale hits counted "
        f"{stale_hits}, stale answers the generator got {sent}"
    )
    print(ratio_line("stale answers / hits", medians["stale answer"], medians["hit"], 0.85))
    print(
        ratio_line(
            "stale answers / hits asked with stale",
            medians["stale answer"],
            medians["hit asked with stale"],
            0.85,
        )
    )


def _store_of(store: str, name: str, scratch: str) -> str:
    """A store of its own for each server, so none sees another's entries or counts."""
    if store.startswith("sqlite://"):
        return f"sqlite://{scratch}/{name}.db"
    if store.startswith("redis") and "?" not in store:
        return f"{store}?namespace=bench-{name}"
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--metrics-only",
        action="store_true",
        help="only the comparison of hits with metrics on and off",
    )
    parser.add_argument(
        "--stale-only",
        action="store_true",
        help="only the comparison of stale answers with fresh hits",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes in the metrics comparison (a shared store)",
    )
    args = parser.parse_args()
    if args.metrics_only:
        compare_metrics(args)
        return
    if args.stale_only:
        compare_stale(args)
        return
    seconds, connections = args.seconds, args.connections
    runs: dict[str, list[Load]] = {"busy": [], "flask": [], "livez": [], "idle": []}
    busy_throughout = True
    slow_ok = 0

    with (
        Server(["--store", args.store, "--max-concurrent", str(SLOW)]) as server,
        Service([sys.executable, str(TOYS), "flask"]) as flask,
    ):
        server.request("POST", "/api/cache/clear")
        server.request("POST", "/api/command", json.loads(HIT_BODY))
        load(flask, "POST", "/api/command", HIT_BODY, connections, 1.0)  # warm up
        load(server, "POST", "/api/command", HIT_BODY, connections, 1.0)
        counted_before = hits_counted(server)
        for round_number in range(args.rounds):
            slow = SlowCommands(server, seconds + SLOW_MARGIN, f"round {round_number}")
            wait_for_running(server, SLOW, 30)
            runs["busy"].append(
                load(server, "POST", "/api/command", HIT_BODY, connections, seconds)
            )
            busy_throughout &= running(server) == SLOW
            runs["flask"].append(
                load(flask, "POST", "/api/command", HIT_BODY, connections, seconds)
            )
            runs["livez"].append(load(server, "GET", "/livez", None, connections, seconds))
            wait_for_running(server, 0, seconds + SLOW_MARGIN + 30)
            slow_ok += slow.succeeded()
            runs["idle"].append(
                load(server, "POST", "/api/command", HIT_BODY, connections, seconds)
            )
        counted = hits_counted(server) - counted_before
    sent = sum(run.requests - run.errors for name in ("busy", "idle") for run in runs[name])
    medians = {name: median_load(loads) for name, loads in runs.items()}

    print(
        f"store {args.store}, {connections} connections, {args.rounds} rounds of {seconds}s, "
        f"--max-concurrent {SLOW}"
    )
    print(f"Flask route (werkzeug, threaded)    {medians['flask'].describe()}")
    print(f"runcache GET /livez                 {medians['livez'].describe()}")
    print(f"runcache hits, idle                 {medians['idle'].describe()}")
    print(f"runcache hits, {SLOW} commands running  {medians['busy'].describe()}")
    print(
        f"{SLOW} commands ran throughout each busy burst: {'yes' if busy_throughout else 'NO'}; "
        f"{slow_ok} of {SLOW * args.rounds} ended with return code 0"
    )
    print(f"hits runcache counted: {counted}; 200 answers the generator got: {sent}")
    print(ratio_line("hits / Flask route", medians["idle"], medians["flask"], 5.0))
    print(
        ratio_line(
            f"hits while {SLOW} commands run / idle hits", medians["busy"], medians["idle"], 0.9
        )
    )
    print(
        f"p99 of hits: idle {medians['idle'].percentile(0.99) * 1e3:.2f} ms, "
        f"while {SLOW} commands run {medians['busy'].percentile(0.99) * 1e3:.2f} ms"
    )
    print()
    compare_metrics(args)
    print()
    compare_stale(args)


if __name__ == "__main__":
    main()
