"""What the HTTP benchmarks share: a server process, keep-alive load, and percentiles."""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Load:
    """The outcome of one timed burst of requests."""

    requests: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def describe(self) -> str:
        return (f"{self.per_second:8.0f} req/s  p50 {self.percentile(0.5) * 1e3:6.2f} ms  "
                f"p99 {self.percentile(0.99) * 1e3:6.2f} ms  errors {self.errors}")


class Server:
    """``runcache serve`` on a free loopback port, stopped on exit."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runcache", "serve", "--port", "0", "--log-level", "WARNING",
             *args],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("runcache listening on "):
            self.process.kill()
            raise SystemExit(f"server did not start: {line!r}")
        self.url = line.split()[-1]
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: object = None) -> dict[str, object]:
        connection = self.connection(timeout=600)
        try:
            data = None if body is None else json.dumps(body)
            connection.request(method, path, body=data,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload: dict[str, object] = json.loads(response.read())
            return payload
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load(server: Server, method: str, path: str, body: bytes | None,
         connections: int, seconds: float) -> Load:
    """Keep-alive clients, each on its own connection, sending as fast as answers come."""
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start_line = threading.Barrier(connections + 1)
    stop_at = [0.0]
    headers = {"Content-Type": "application/json"}

    def client(index: int) -> None:
        connection = server.connection()
        start_line.wait()
        mine = latencies[index]
        while True:
            began = time.perf_counter()
            if began >= stop_at[0]:
                break
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors[index] += 1
            mine.append(time.perf_counter() - began)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = [latency for per_client in latencies for latency in per_client]
    return Load(len(flat), elapsed, flat, sum(errors))


def median_load(runs: list[Load]) -> Load:
    """The run with the median throughput, so one noisy burst does not decide."""
    return sorted(runs, key=lambda run: run.per_second)[len(runs) // 2]


def ratio_line(name: str, numerator: Load, denominator: Load, goal: float) -> str:
    value = numerator.per_second / denominator.per_second
    verdict = "meets" if value >= goal else "MISSES"
    return f"{name}: {value:.2f} ({verdict} the goal of {goal:.2f})"


def median(values: list[float]) -> float:
    return statistics.median(values)
