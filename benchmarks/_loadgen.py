"""The load generator: keep-alive HTTP/1.1 requests as fast as a server answers them.

It runs in processes of its own, apart from the benchmark's threads and from
the server: each runs one event loop (uvloop when installed, as runcache's
server does) over raw sockets, sends one prebuilt HTTP/1.1 request per
connection, reads the answer by its ``Content-Length``, and sends the next as
soon as it is in. On the 2-core machine the figures come from, one such process
keeps pace with wrk and drives a server that only writes a fixed answer at
about 100,000 req/s, several times what one uvicorn process answers for a
route that does nothing (``python3 benchmarks/harness_check.py`` measures all
of it), so what the benchmarks measure is the server. One process is the
default: on 2 cores a second one takes the core the server needs.

Every load is bounded in time (``seconds``, plus ``GRACE_SECONDS`` for the last
answers) and in count (``MAX_RATE`` requests a second).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol, cast

#: Seconds a load waits past its end for the answers still on their way.
GRACE_SECONDS = 10.0

#: Requests a second no load sends more than (a bound on its count, far above any server here).
MAX_RATE = 500_000

#: Seconds a generator process gets to start and connect.
START_SECONDS = 60.0


@dataclass
class Load:
    """The outcome of one timed burst of requests."""

    requests: int
    seconds: float
    latencies: Sequence[float]
    errors: int  # answers other than 200, and requests that got no answer

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def describe(self) -> str:
        return (
            f"{self.per_second:8.0f} req/s  p50 {self.percentile(0.5) * 1e3:6.2f} ms  "
            f"p99 {self.percentile(0.99) * 1e3:6.2f} ms  errors {self.errors}"
        )


class Target(Protocol):
    """Where the load goes: a server on a loopback address."""

    host: str
    port: int


def http_request(method: str, path: str, host: str, port: int, body: bytes | None) -> bytes:
    """One HTTP/1.1 request, as bytes to send again and again on a keep-alive connection."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def load(
    server: Target,
    method: str,
    path: str,
    body: bytes | None,
    connections: int,
    seconds: float,
    processes: int = 1,
) -> Load:
    """Keep-alive connections, each sending its next request as soon as an answer is in.

    ``connections`` are shared out over ``processes`` generator processes; all
    of them connect first, then send together for ``seconds``.
    """
    processes = max(1, min(processes, connections))
    request = http_request(method, path, server.host, server.port, body)
    context = multiprocessing.get_context("spawn")  # the benchmark has threads: no fork
    go = context.Event()
    workers = []
    for index in range(processes):
        share = connections // processes + (index < connections % processes)
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_generate,
            daemon=True,
            args=(sender, go, server.host, server.port, request, share, seconds),
        )
        process.start()
        sender.close()
        workers.append((process, receiver))
    try:
        for _, receiver in workers:
            _expect(receiver, START_SECONDS, "ready")
        go.set()
        parts = [
            _expect(receiver, seconds + GRACE_SECONDS + START_SECONDS, "result")
            for _, receiver in workers
        ]
    finally:
        for process, _ in workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    latencies: array[float] = array("d")
    for part in parts:
        latencies.extend(part["latencies"])
    return Load(
        requests=sum(part["requests"] for part in parts),
        seconds=max(part["seconds"] for part in parts),
        latencies=latencies,
        errors=sum(part["errors"] for part in parts),
    )


def _expect(receiver: Connection, timeout: float, kind: str) -> dict[str, Any]:
    if not receiver.poll(timeout):
        raise SystemExit(f"load generator sent no {kind} in {timeout:.0f} s")
    message: dict[str, Any] = receiver.recv()
    if message.get("kind") != kind:
        raise SystemExit(f"load generator failed: {message.get('error')}")
    return message


def _generate(
    sender: Connection,
    go: object,
    host: str,
    port: int,
    request: bytes,
    connections: int,
    seconds: float,
) -> None:
    """One generator process: its connections, on one event loop."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(
            _drive(sender, go, host, port, request, connections, seconds)
        )
        sender.send({"kind": "result", **result})
    except Exception as error:  # reported to the parent, which stops the benchmark
        sender.send({"kind": "error", "error": repr(error)})
    finally:
        loop.close()


async def _drive(
    sender: Connection,
    go: object,
    host: str,
    port: int,
    request: bytes,
    connections: int,
    seconds: float,
) -> dict[str, object]:
    latencies: array[float] = array("d")
    lanes = [_Lane(host, port, request, latencies) for _ in range(connections)]
    try:
        for lane in lanes:
            await lane.connect()
        sender.send({"kind": "ready"})
        if not go.wait(START_SECONDS):  # type: ignore[attr-defined]
            raise TimeoutError("no start signal")
        began = time.perf_counter()
        budget = max(1, int(MAX_RATE * seconds) // connections)
        for lane in lanes:
            lane.start(began + seconds, budget)
        await asyncio.wait([lane.done for lane in lanes], timeout=seconds + GRACE_SECONDS)
        elapsed = time.perf_counter() - began
    finally:
        for lane in lanes:
            lane.finish()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "latencies": latencies,
        "errors": sum(lane.errors for lane in lanes),
    }


class _Lane:
    """One client sending ``request`` until its deadline or budget runs out.

    It keeps its connection alive, and opens a new one when an answer says
    ``Connection: close`` (werkzeug's server closes after every answer); the
    next request's latency then includes the connect. A connection lost with
    a request unanswered counts an error and ends the lane.
    """

    def __init__(self, host: str, port: int, request: bytes, latencies: array[float]) -> None:
        self.host, self.port, self.request, self.latencies = host, port, request, latencies
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connection: _Connection | None = None
        self.sent_at = 0.0
        self.in_flight = False
        self.errors = 0
        self.deadline = 0.0
        self.budget = 0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self), self.host, self.port), START_SECONDS
        )

    def start(self, deadline: float, budget: int) -> None:
        self.deadline, self.budget = deadline, budget
        self._sent()
        self._write()

    def _sent(self) -> None:
        self.budget -= 1
        self.in_flight = True
        self.sent_at = time.perf_counter()

    def _write(self) -> None:
        assert self.connection is not None
        self.connection.transport.write(self.request)

    def answered(self, connection: _Connection, status: int, keep_alive: bool) -> None:
        now = time.perf_counter()
        self.latencies.append(now - self.sent_at)
        self.in_flight = False
        if status != 200:
            self.errors += 1
        if now >= self.deadline or self.budget <= 0 or self.done.done():
            self.finish()
        elif keep_alive:
            self._sent()
            self._write()
        else:
            connection.retire()
            self._sent()
            asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self.connect()
        except (TimeoutError, OSError):
            self.finish()  # counts the unsent request
            return
        if self.done.done():
            self.finish()
        else:
            self._write()

    def lost(self, connection: _Connection, error: bool) -> None:
        """``connection`` is gone (or sent what this client cannot read: ``error``)."""
        if error:
            self.errors += 1
        if connection is self.connection:
            self.finish()

    def finish(self) -> None:
        """Stop: an unanswered request counts as an error; idempotent."""
        if self.in_flight:
            self.errors += 1
            self.in_flight = False
        if not self.done.done():
            self.done.set_result(None)
        if self.connection is not None:
            self.connection.retire()


class _Connection(asyncio.Protocol):
    """One socket of a lane: reads each answer by its ``Content-Length``."""

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane
        self.buffer = bytearray()
        self.expected = -1  # bytes of the current answer, once its head is in
        self.status = 0
        self.keep_alive = True
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while not self.retired:
            if self.expected < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                at = head.find(b"\r\ncontent-length:")
                if at < 0:  # chunked or close-delimited: not what these benchmarks expect
                    self.retire()
                    self.lane.lost(self, error=True)
                    return
                stop = head.find(b"\r\n", at + 2)
                self.status = int(head[9:12])
                self.keep_alive = b"\r\nconnection: close" not in head
                self.expected = end + 4 + int(head[at + 17 : stop if stop > 0 else len(head)])
            if len(buffer) < self.expected:
                return
            del buffer[: self.expected]
            self.expected = -1
            self.lane.answered(self, self.status, self.keep_alive)

    def retire(self) -> None:
        """Close it, and let its end go unremarked."""
        self.retired = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.retired:
            self.retired = True
            self.lane.lost(self, error=False)


def median_load(runs: list[Load]) -> Load:
    """The run with the median throughput, so one noisy burst does not decide."""
    return sorted(runs, key=lambda run: run.per_second)[len(runs) // 2]


def ratio_line(name: str, numerator: Load, denominator: Load, goal: float | None = None) -> str:
    value = numerator.per_second / denominator.per_second
    if goal is None:
        return f"{name}: {value:.2f}"
    verdict = "meets" if value >= goal else "MISSES"
    return f"{name}: {value:.2f} ({verdict} the goal of {goal:.2f})"
