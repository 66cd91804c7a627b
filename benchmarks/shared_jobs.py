"""Jobs across instances: follow and control latency, and hits beside printing jobs, in one run.

Run:  python3 benchmarks/shared_jobs.py [--lines 100] [--controls 30] [--seconds 3] [--rounds 3]
          [--jobs 20] [--interval 0.01]

For each shared store (two ``runcache serve`` on one throwaway ``redis-server``,
then two on one SQLite file: the same code as ``--workers 2`` on that file,
with each server addressable) it measures:

- follow latency: a job on A prints a line with the wall clock time every 20 ms;
  an SSE reader of ``/api/jobs/{id}/events`` on B notes when each line arrives
  (p50, p99; goal p99 < 50 ms);
- control latency: ``POST /api/jobs/{id}/pause`` (then ``/resume``) sent to B for
  a job on A, from the request to the process's state changing (psutil, read
  in a tight loop) (p50, p99; goal p99 < 100 ms);
- cache hits on A and B at once with ``--jobs`` jobs printing a line every
  ``--interval`` seconds (20 every 10 ms by default, half on each) and with the same
  jobs paused (no job running), in alternating rounds, and the ratio of their medians
  (goal >= 0.9); and the servers' own CPU while the jobs print and no hit comes (what
  publishing them costs). ``--jobs 2 --interval 0.05`` is the issue's case: a job
  running on each, printing as a build or a scan does.

Then the same hits with two servers on the memory store (no board: each keeps its
own jobs), for what the 20 printing jobs cost the machine without a board: on a
machine with cores to spare the ratio there is 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from _harness import Server
from _loadgen import Load, load, median_load, ratio_line
from store_hits import HIT_BODY, start_redis

#: A job that prints the wall clock every 20 ms, ``{lines}`` times.
PRINTER = (
    "import sys, time\nfor _ in range({lines}):\n"
    "    print(repr(time.time()), flush=True)\n    time.sleep(0.02)\n"
)


#: A job printing a line every ``{interval}`` seconds until cancelled, without forking for
#: each (a shell loop's ``sleep`` would cost the machine more than any server does).
PRINTING = (
    "import time\nwhile True:\n"
    "    print('printing a line of output', flush=True)\n    time.sleep({interval})\n"
)


def start_job(server: Server, command: str) -> dict[str, Any]:
    answer = server.request("POST", "/api/command", {"command": command, "background": True})
    assert isinstance(answer, dict), answer
    return answer


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"p50 {statistics.median(values) * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms"


def follow_latency(one: Server, two: Server, lines: int) -> list[float]:
    """Arrival on B's SSE minus print time on A, for each line."""
    program = PRINTER.format(lines=lines)
    job = start_job(one, f"{shlex.quote(sys.executable)} -c {shlex.quote(program)}")
    delays: list[float] = []
    connection = two.connection()
    connection.request("GET", f"/api/jobs/{job['job_id']}/events")
    answer = connection.getresponse()
    while True:
        line = answer.readline()
        if not line or line.startswith(b"event: result"):
            break
        if line.startswith(b"data: ") and line[6:].strip():
            arrived = time.time()
            try:
                delays.append(arrived - float(line[6:]))
            except ValueError:
                continue
    connection.close()
    return delays


def until_state(process: psutil.Process, stopped: bool) -> float:
    """When the process is stopped (``stopped``) or running again, read in a tight loop."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if (process.status() == psutil.STATUS_STOPPED) == stopped:
            return time.monotonic()
    raise SystemExit(f"the process never changed state: {process.status()}")


def control_latency(one: Server, two: Server, count: int) -> list[float]:
    """From a pause (or resume) sent to B to the state change of A's process."""
    job = start_job(one, "sleep 120")
    process = psutil.Process(job["pid"])
    # The shell forks ``sleep`` with vfork: a SIGSTOP before the child has exec'd leaves
    # the shell in uninterruptible sleep, never "stopped". Measure once it has.
    deadline = time.monotonic() + 5
    while not any(child.name() == "sleep" for child in process.children()):
        if time.monotonic() > deadline:
            raise SystemExit("the job never started sleep")
        time.sleep(0.01)
    delays = []
    for index in range(count):
        verb = "pause" if index % 2 == 0 else "resume"
        stopped = verb == "pause"
        connection = two.connection()
        sent = time.monotonic()
        connection.request("POST", f"/api/jobs/{job['job_id']}/{verb}")
        try:
            changed = until_state(process, stopped)
        finally:
            answer = connection.getresponse().read()
        assert b'"success":true' in answer.replace(b" ", b""), answer
        connection.close()
        delays.append(changed - sent)
    two.request("POST", f"/api/jobs/{job['job_id']}/cancel")
    return delays


def hits_on_both(one: Server, two: Server, seconds: float) -> Load:
    """Hits to A and B at once; the sum of both as one load."""
    found: list[Load] = []
    threads = [
        threading.Thread(
            target=lambda server=server: found.append(
                load(server, "POST", "/api/command", HIT_BODY, 4, seconds)
            )
        )
        for server in (one, two)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Load(
        sum(run.requests for run in found),
        max(run.seconds for run in found),
        [latency for run in found for latency in run.latencies],
        sum(run.errors for run in found),
    )


def steer(jobs: list[tuple[Server, str]], verb: str) -> None:
    for server, job_id in jobs:
        answer = server.request("POST", f"/api/jobs/{job_id}/{verb}")
        assert answer.get("success") is True, answer


def server_cpu(servers: tuple[Server, Server]) -> float:
    """User + system CPU seconds of both server processes, their commands left out."""
    return sum(sum(psutil.Process(server.process.pid).cpu_times()[:2]) for server in servers)


def measure(name: str, store: str, args: argparse.Namespace, shared: bool = True) -> None:
    """``shared``: the store is shared (a job board); else (memory) only the hits, for
    what the printing jobs cost the machine without a board."""
    with Server(["--store", store]) as one, Server(["--store", store]) as two:
        for server in (one, two):
            server.request("POST", "/api/command", json.loads(HIT_BODY))
        if shared:
            follow = follow_latency(one, two, args.lines)
            control = control_latency(one, two, args.controls)
            print(f"{name}: follow A -> SSE on B   {percentiles(follow)}  ({len(follow)} lines)")
            print(f"{name}: control B -> A        {percentiles(control)}  ({len(control)} ops)")
        printing = PRINTING.format(interval=args.interval)
        printer = f"{shlex.quote(sys.executable)} -c {shlex.quote(printing)}"
        jobs = [
            # Distinct commands: the same one on A and B would run once (single flight).
            (server, start_job(server, f"{printer} # {index} {server.port}")["job_id"])
            for index in range(max(1, args.jobs // 2))
            for server in (one, two)
        ]
        for server, job_id in jobs:  # each has its slot and its process
            deadline = time.monotonic() + 30
            while (found := server.request("GET", f"/api/jobs/{job_id}")).get("pid") is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"job {job_id} never started: {found}")
                time.sleep(0.05)
        before, started = server_cpu((one, two)), time.monotonic()
        time.sleep(args.seconds)
        idle_cpu = (server_cpu((one, two)) - before) / (time.monotonic() - started) / 2
        # Rounds alternate the jobs paused (no job running) and printing, so that what
        # else loads the machine weighs on both alike; the median of each is compared.
        quiet_runs, busy_runs = [], []
        for _ in range(args.rounds):
            steer(jobs, "pause")
            quiet_runs.append(hits_on_both(one, two, args.seconds))
            steer(jobs, "resume")
            busy_runs.append(hits_on_both(one, two, args.seconds))
        quiet, busy = median_load(quiet_runs), median_load(busy_runs)
        steer(jobs, "cancel")
    count = f"{len(jobs)} jobs"
    print(f"{name}: server CPU with {count} printing, no hits: {idle_cpu:.1%} of a core each")
    print(f"{name}: hits A+B, {count} paused {quiet.describe()}")
    print(f"{name}: hits A+B, {count} printing every {args.interval:g}s {busy.describe()}")
    print(ratio_line(f"{name}: hits with {count} printing / paused", busy, quiet, 0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--controls", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20, help="printing jobs, half on each")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        redis_process, port = start_redis(Path(directory))
        try:
            measure("redis", f"redis://127.0.0.1:{port}/0?namespace=bench-jobs", args)
        finally:
            redis_process.terminate()
            redis_process.wait(10)
        measure("sqlite", f"sqlite://{directory}/jobs.db", args)
        measure("memory", "memory://", args, shared=False)


if __name__ == "__main__":
    main()
