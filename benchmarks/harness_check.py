"""Whether the load generator measures the server or itself: it against wrk, on two toy servers.

Run:  python3 benchmarks/harness_check.py [--seconds 3] [--rounds 3] [--connections 8]

Starts two toy servers from ``benchmarks/_toy_routes.py`` on free loopback
ports: ``raw``, which writes a fixed answer to every request (as fast as a
Python server can answer at all), and ``starlette``, the bare hit route on
Starlette and uvicorn. Each round sends ``POST /api/command`` to each server
from the harness's generator (one process) and, when ``wrk`` is installed, from
wrk with one thread, both over the same number of keep-alive connections,
alternating round by round. It prints the median round of each and the ratio
generator / wrk per server. On the raw server the generator must far outrun
any server the benchmarks measure; on the Starlette route a ratio near 1
says the generator is not the bottleneck. Needs starlette and uvicorn
(runcache's own dependencies); wrk is optional.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import Service
from _loadgen import Load, load, median_load, ratio_line
from _toy_routes import COMMAND

BODY = json.dumps({"command": COMMAND}).encode()
TOYS = Path(__file__).with_name("_toy_routes.py")

WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(executable: str, script: Path, server: Service, connections: int, seconds: float) -> Load:
    """wrk's figures as a Load: its own req/s, p50 and p99 (it gives no raw latencies)."""
    finished = subprocess.run(
        [
            executable,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            f"{server.url}/api/command",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    out = finished.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def percentile(name: str) -> float:
        found = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)$", out, re.MULTILINE)
        assert found, out
        return float(found.group(1)) * _UNITS[found.group(2)]

    # Two latencies stand for the distribution: Load.percentile reads p50 and p99 from them.
    p50, p99 = percentile("50"), percentile("99")
    latencies = [p50] * 98 + [p99] * 2
    return Load(
        requests=round(rate * 1000),
        seconds=1000.0,
        latencies=latencies,
        errors=int(errors.group(1)) if errors else 0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    wrk_executable = shutil.which("wrk")
    servers = {name: Service([sys.executable, str(TOYS), name]) for name in ("raw", "starlette")}
    runs: dict[tuple[str, str], list[Load]] = {}
    try:
        with tempfile.TemporaryDirectory() as directory:
            script = Path(directory, "post.lua")
            script.write_text(WRK_SCRIPT)
            for server in servers.values():
                load(server, "POST", "/api/command", BODY, args.connections, 1.0)  # warm up
            for _ in range(args.rounds):
                for name, server in servers.items():
                    runs.setdefault((name, "generator"), []).append(
                        load(server, "POST", "/api/command", BODY, args.connections, args.seconds)
                    )
                    if wrk_executable:
                        runs.setdefault((name, "wrk"), []).append(
                            wrk(wrk_executable, script, server, args.connections, args.seconds)
                        )
    finally:
        for server in servers.values():
            server.stop()

    print(
        f"POST /api/command, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s; generator: 1 process; wrk: 1 thread"
    )
    for name in servers:
        for tool in ("generator", "wrk"):
            if (name, tool) in runs:
                print(f"{name:9} {tool:9} {median_load(runs[name, tool]).describe()}")
    if not wrk_executable:
        print("wrk is not installed: no comparison")
        return
    for name in servers:
        print(
            ratio_line(
                f"generator / wrk on {name}",
                median_load(runs[name, "generator"]),
                median_load(runs[name, "wrk"]),
            )
        )


if __name__ == "__main__":
    main()
