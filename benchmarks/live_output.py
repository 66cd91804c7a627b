"""Live output: how soon an SSE reader sees a line, and what 200 readers cost cache hits.

Run:  python3 benchmarks/live_output.py [--lines 300] [--readers 200] [--interval 0.05]
                                        [--seconds 3] [--rounds 3]

Starts ``runcache serve`` (memory store) on a free loopback port.

1. **Latency.** A background job (``use_cache`` false) waits on a gate file,
   then prints ``--lines`` lines, one every 20 ms, each holding the wall-clock
   time it was printed (``time.time()``, flushed at once). A reader follows the
   job's ``/api/jobs/{id}/events`` over a raw loopback socket, connected before
   the gate opens, and takes each line's latency as the time it read the event
   minus the time in the line. In the same run, the same printer runs as this
   process's own child and its lines are read from the pipe: the floor, what
   any reader of a pipe on this machine would see. It prints p50 and p99 of
   both (goal: SSE p99 under 50 ms) and the ratio of the two p99s.
2. **Hits while 200 readers follow.** One cached command; rounds of cached
   ``POST /api/command`` hits (the load generator of ``_loadgen.py``, 8
   keep-alive connections) alternate between idle and while ``--readers``
   SSE connections (in a process of their own) follow one job that prints a
   line every ``--interval`` seconds (50 ms). Each reader must receive events
   during the burst (their counts are taken before and after it). It prints
   the median of each, the ratio followed / idle of each round and their
   median (goal at least 0.9).
3. **What a delivered event costs.** In each round, before its burst, the
   readers follow the job for ``--quiet`` seconds with no other load: the
   server's CPU time (user + system, its own process) over the events the
   readers received is the CPU one SSE event costs the server, and the events
   a second times that cost is the share of a core following takes from hits.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

from _harness import Server
from _loadgen import Load, load, median_load

HIT_BODY = b'{"command": "echo live-output benchmark"}'

#: Seconds between two lines of the latency printer.
LATENCY_INTERVAL = 0.02


def printer(lines: int, interval: float) -> str:
    """A command printing ``lines`` lines of the wall-clock time, ``interval`` s apart."""
    code = (
        f"import sys, time\nfor _ in range({lines}):\n"
        f"    print(f'{{time.time():.6f}}', flush=True)\n    time.sleep({interval})"
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start_job(server: Server, command: str) -> str:
    answer = server.request(
        "POST", "/api/command", {"command": command, "use_cache": False, "background": True}
    )
    job_id = answer.get("job_id")
    assert isinstance(job_id, str), answer
    return job_id


async def open_events(
    host: str, port: int, job_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    while (await reader.readline()) not in (b"\r\n", b""):  # the response head
        pass
    return reader, writer


async def sse_latencies(host: str, port: int, job_id: str, gate: Path) -> list[float]:
    """Each stdout line's latency, read as SSE; the gate opens once the reader is connected."""
    reader, writer = await open_events(host, port, job_id)
    gate.touch()
    latencies: list[float] = []
    event = ""
    while True:
        line = await reader.readline()
        if not line:
            break
        text = line.decode().rstrip("\r\n")
        if text.startswith("event: "):
            event = text[7:]
            if event == "result":
                break
        elif text.startswith("data: ") and event == "stdout":
            # Chunked transfer encoding puts chunk sizes on lines of their own: skipped here.
            received = time.time()
            latencies.extend(received - float(value) for value in text[6:].split() if value)
    writer.close()
    return latencies


def pipe_latencies(lines: int) -> list[float]:
    """The same printer read from a pipe: what any reader of a pipe sees on this machine."""
    latencies: list[float] = []
    with subprocess.Popen(
        printer(lines, LATENCY_INTERVAL), shell=True, stdout=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            latencies.append(time.time() - float(line))
    return latencies


def measure_latency(server: Server, lines: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as folder:
        gate = Path(folder) / "gate"
        command = f"while [ ! -e {gate} ]; do sleep 0.005; done; {printer(lines, LATENCY_INTERVAL)}"
        job_id = start_job(server, command)
        sse = asyncio.run(sse_latencies(server.host, server.port, job_id, gate))
    return sse, pipe_latencies(lines)


# -- many readers, in a process of their own -------------------------------------------


def follow_many(host: str, port: int, job_id: str, readers: int, control: Connection) -> None:
    """Keep ``readers`` SSE connections reading; report event counts whenever asked."""
    counts = [0] * readers

    async def follow(index: int) -> None:
        reader, writer = await open_events(host, port, job_id)
        try:  # counted in whole reads, so the readers spend little of the machine's CPU
            while data := await reader.read(65536):
                counts[index] += data.count(b"\nevent: ") + data.startswith(b"event: ")
        finally:
            writer.close()

    async def main() -> None:
        tasks = [asyncio.ensure_future(follow(index)) for index in range(readers)]
        loop = asyncio.get_running_loop()
        while True:
            request = await loop.run_in_executor(None, control.recv)
            if request == "stop":
                break
            control.send(list(counts))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


class Readers:
    """``count`` SSE readers of one job, in a child process, connected on start."""

    def __init__(self, server: Server, job_id: str, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.control, child = context.Pipe()
        self.process = context.Process(
            target=follow_many, daemon=True, args=(server.host, server.port, job_id, count, child)
        )
        self.process.start()
        deadline = time.monotonic() + 60
        while min(self.counts()) == 0:  # every reader connected and got an event
            if time.monotonic() > deadline:
                raise SystemExit("the SSE readers did not all connect")
            time.sleep(0.1)

    def counts(self) -> list[int]:
        self.control.send("counts")
        counts: list[int] = self.control.recv()
        return counts

    def stop(self) -> None:
        self.control.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def server_cpu(server: Server) -> float:
    """User + system CPU seconds of the server's own process so far (not its commands)."""
    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--interval", type=float, default=0.05, help="seconds between two lines of the followed job"
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=2.0,
        help="seconds the readers follow with no load, for the CPU per event",
    )
    args = parser.parse_args()

    with Server(["--max-concurrent", "8"]) as server:
        sse, pipe = measure_latency(server, args.lines)
        server.request("POST", "/api/command", {"command": "echo live-output benchmark"})
        load(server, "POST", "/api/command", HIT_BODY, args.connections, 1.0)  # warm up
        runs: dict[str, list[Load]] = {"idle": [], "followed": []}
        ratios: list[float] = []
        quiet_readers = 0
        burst_events: list[float] = []  # events a second all readers got during each burst
        cpu_per_event: list[float] = []
        quiet_events: list[float] = []
        for _ in range(args.rounds):
            runs["idle"].append(
                load(server, "POST", "/api/command", HIT_BODY, args.connections, args.seconds)
            )
            lines = int((args.seconds + args.quiet + 60) / args.interval)
            job_id = start_job(server, printer(lines, args.interval))
            readers = Readers(server, job_id, args.readers)
            # Following alone: the server's CPU per event delivered.
            events, cpu, began = sum(readers.counts()), server_cpu(server), time.monotonic()
            time.sleep(args.quiet)
            events = sum(readers.counts()) - events
            cpu, took = server_cpu(server) - cpu, time.monotonic() - began
            cpu_per_event.append(cpu / max(events, 1))
            quiet_events.append(events / took)
            before, began = readers.counts(), time.monotonic()
            runs["followed"].append(
                load(server, "POST", "/api/command", HIT_BODY, args.connections, args.seconds)
            )
            after, took = readers.counts(), time.monotonic() - began
            burst_events.append((sum(after) - sum(before)) / took)
            quiet_readers += sum(1 for old, new in zip(before, after, strict=True) if new <= old)
            readers.stop()
            server.request("POST", f"/api/jobs/{job_id}/cancel")
            ratios.append(runs["followed"][-1].per_second / runs["idle"][-1].per_second)

    print(
        f"latency from a printed line to its reader, {len(sse)} lines "
        f"{LATENCY_INTERVAL * 1e3:.0f} ms apart:"
    )
    for name, values in (("SSE reader (/api/jobs/{id}/events)", sse), ("pipe (the floor)", pipe)):
        print(
            f"  {name:<36} p50 {percentile(values, 0.5) * 1e3:6.2f} ms  "
            f"p99 {percentile(values, 0.99) * 1e3:6.2f} ms  mean "
            f"{statistics.fmean(values) * 1e3:6.2f} ms"
        )
    goal = "meets" if percentile(sse, 0.99) < 0.050 else "MISSES"
    print(
        f"SSE p99: {percentile(sse, 0.99) * 1e3:.2f} ms ({goal} the goal of < 50 ms); "
        f"SSE p99 / pipe p99: {percentile(sse, 0.99) / percentile(pipe, 0.99):.1f}"
    )
    idle, followed = median_load(runs["idle"]), median_load(runs["followed"])
    print(
        f"cached hits, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s each, idle and followed alternating; the followed job prints a "
        f"line every {args.interval * 1e3:g} ms:"
    )
    print(f"  idle                                 {idle.describe()}")
    print(f"  {args.readers} SSE readers following a job  {followed.describe()}")
    print(
        f"  SSE events the readers got during the bursts: "
        f"{statistics.median(burst_events):.0f}/s (median round); readers that got none "
        f"during a burst: {quiet_readers} of {args.readers * args.rounds}"
    )
    per_event, rate = statistics.median(cpu_per_event), statistics.median(quiet_events)
    print(
        f"  following alone ({args.quiet:g}s a round): {rate:.0f} events/s, server CPU "
        f"{per_event * 1e6:.1f} µs per event = {rate * per_event:.0%} of a core"
    )
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio >= 0.9 else "MISSES"
    print(
        f"hits while {args.readers} readers follow / idle hits, per round: "
        f"{', '.join(f'{each:.2f}' for each in ratios)}; median {ratio:.2f} "
        f"({verdict} the goal of 0.90)"
    )


if __name__ == "__main__":
    main()
