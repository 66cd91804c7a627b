"""1,000 concurrent identical requests for a slow command: runs, answers, threads and RSS.

Run:  python3 benchmarks/waiters.py [--clients 1000] [--sleep 2]

Starts ``runcache serve`` (memory store, default settings) on a free loopback
port, with the open-file limit raised for both sides if it is below what 1,000
connections need. One client process (this one, on one event loop) opens
``--clients`` connections, then writes on each, one after the other, the same
``POST /api/command`` for ``echo run >> FILE; sleep 2; echo x`` and reads
every answer (waiting at most the sleep plus 60 s). Each run of the command
adds a line to FILE, so its lines count the runs. A thread samples the
server process's thread count and RSS (psutil) every 20 ms from before the
connections open until the last answer is in.

It prints: runs (goal 1), answers with status 200 and stdout ``x\\n`` (goal
1,000), how long the requests took to send and when the answers came, the
server's thread count before and at its peak (goal < 100), and its RSS before
and at its peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil

from _harness import Server
from _loadgen import http_request

#: Seconds between two samples of the server's threads and RSS.
SAMPLE_SECONDS = 0.02


class Sampler(threading.Thread):
    """Peak thread count and RSS of one process, sampled until stopped (or ``limit`` s)."""

    def __init__(self, pid: int, limit: float) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.limit = limit
        self.stopping = threading.Event()
        self.first_threads = self.process.num_threads()
        self.first_rss = self.process.memory_info().rss
        self.peak_threads = self.first_threads
        self.peak_rss = self.first_rss
        self.samples = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stopping.wait(SAMPLE_SECONDS) and time.monotonic() < deadline:
            with self.process.oneshot():
                self.peak_threads = max(self.peak_threads, self.process.num_threads())
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self.samples += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


def raise_open_files(needed: int) -> None:
    """Lift the soft limit on open files (inherited by the server) to ``needed`` if it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"open-file limit {hard} is below the {needed} this needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def ask_all(
    server: Server, body: bytes, clients: int, timeout: float
) -> tuple[list[tuple[int, bytes, float]], float, float]:
    """Connect ``clients`` times, then send ``body`` on each; each answer with its arrival time.

    Returns the answers (status, body, seconds after the first send), the
    seconds the sends took, and the seconds from the first send to the last answer.
    """
    streams = await asyncio.wait_for(
        asyncio.gather(
            *(asyncio.open_connection(server.host, server.port) for _ in range(clients))
        ),
        60,
    )
    request = http_request("POST", "/api/command", server.host, server.port, body)
    began = time.perf_counter()
    for _, writer in streams:
        writer.write(request)
    sending = time.perf_counter() - began

    async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        at = head.index(b"\r\ncontent-length:") + 17
        length = int(head[at : head.index(b"\r\n", at)])
        payload = await reader.readexactly(length)
        return int(head[9:12]), payload, time.perf_counter() - began

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(answer(reader) for reader, _ in streams), return_exceptions=True),
            timeout,
        )
    finally:
        for _, writer in streams:
            writer.close()
    answers = [result for result in results if isinstance(result, tuple)]
    failures = [result for result in results if not isinstance(result, tuple)]
    if failures:
        print(f"{len(failures)} connections failed, the first with {failures[0]!r}")
    return answers, sending, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=2.0)
    args = parser.parse_args()
    raise_open_files(args.clients + 1024)
    timeout = args.sleep + 60

    with tempfile.TemporaryDirectory() as directory, Server() as server:
        runs_file = Path(directory, "runs")
        command = f"echo run >> {runs_file}; sleep {args.sleep:g}; echo x"
        body = json.dumps({"command": command}).encode()
        sampler = Sampler(server.process.pid, limit=timeout + 120)
        sampler.start()
        try:
            answers, sending, elapsed = asyncio.run(ask_all(server, body, args.clients, timeout))
        finally:
            sampler.stop()
        runs = len(runs_file.read_text().splitlines()) if runs_file.exists() else 0

    good = [
        seconds
        for status, payload, seconds in answers
        if status == 200 and json.loads(payload).get("stdout") == "x\n"
    ]
    coalesced = sum(
        bool(json.loads(payload).get("coalesced"))
        for status, payload, _ in answers
        if status == 200
    )
    statuses = sorted({status for status, _, _ in answers})
    shown = command.replace(directory, "$TMP")
    print(f"{args.clients} concurrent identical requests for {shown!r}")
    print(
        f"requests sent in {sending * 1e3:.0f} ms; last answer {elapsed:.2f} s after the first "
        f"request"
    )
    print(f"runs: {runs} (goal 1)")
    print(
        f"answers with 200 and stdout 'x\\n': {len(good)} of {args.clients} (goal "
        f"{args.clients}); statuses seen {statuses}; {coalesced} said coalesced"
    )
    if good:
        print(f"good answers came {min(good):.2f} to {max(good):.2f} s after the first request")
    verdict = "meets" if sampler.peak_threads < 100 else "MISSES"
    print(
        f"server threads: {sampler.first_threads} before, peak {sampler.peak_threads} "
        f"({verdict} the goal of < 100; {sampler.samples} samples every "
        f"{SAMPLE_SECONDS * 1e3:.0f} ms)"
    )
    print(
        f"server RSS: {sampler.first_rss / 1e6:.0f} MB before, peak {sampler.peak_rss / 1e6:.0f} MB"
    )


if __name__ == "__main__":
    main()
