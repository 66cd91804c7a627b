"""End to end: ``runcache serve`` under load and abuse, over raw loopback sockets.

A thousand clients waiting on one run, idle and trickling connections, bodies
past the limit and malformed HTTP, each against a real server process. The
clients are asyncio streams in this one thread, so a thousand connections
cost the test no thread each either.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import psutil
import pytest

from conftest import LiveServer

HOST = "127.0.0.1"

#: Connections the busiest test holds at once, with room for the server's own files.
OPEN_FILES = 4096

#: Seconds any one answer may take before a test gives up on it.
ANSWER_TIMEOUT = 30.0

#: The bound a new client's request must meet while others hold connections. The
#: issue's 100 ms is for the benchmark; 1 s cannot be missed by a slow machine
#: alone, yet a server that locks new clients out misses it by far.
NO_LOCK_OUT_SECONDS = 1.0

MiB = 1024 * 1024


# -- raw HTTP ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def post_request(path: str, body: bytes, *, close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), len(body), connection, body)
    )


def get_request(path: str, *, close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), connection)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer with a Content-Length (every answer runcache gives a small request)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return Answer(int(status_line.split()[1]), headers, body)


async def exchange(port: int, request: bytes) -> Answer:
    """Send ``request`` on a new connection and read its answer."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_answer(reader), ANSWER_TIMEOUT)
    finally:
        writer.close()


async def timed(call: Awaitable[Answer]) -> tuple[Answer, float]:
    started = time.monotonic()
    answer = await call
    return answer, time.monotonic() - started


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds``, sending nothing."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return False
    except ConnectionError:  # reset: closed with our bytes unread
        return True
    assert data == b"", f"the server answered instead of closing: {data[:200]!r}"
    return True


async def trickle(
    port: int,
    data: bytes,
    interval: float,
    *,
    wait: float = 10.0,
    two_sent: asyncio.Event | None = None,
) -> float:
    """Send ``data`` a byte every ``interval`` seconds on a new connection (``two_sent`` is
    set once two bytes are written).

    Returns the seconds from connecting until the server closed the connection;
    fails if it is still open ``wait`` seconds after the last byte.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for index in range(len(data)):
            writer.write(data[index : index + 1])
            if two_sent is not None and index == 1:
                two_sent.set()
            if await closed_within(reader, interval):
                return time.monotonic() - started
        if await closed_within(reader, wait):
            return time.monotonic() - started
        raise AssertionError(f"the server kept a connection open that sent {data!r} slowly")
    finally:
        writer.close()


async def time_to_close(reader: asyncio.StreamReader, started: float, wait: float = 10.0) -> float:
    """Seconds from ``started`` until the server closes; fails if it keeps it ``wait`` s."""
    assert await closed_within(reader, wait), "the server kept an idle connection open"
    return time.monotonic() - started


@pytest.fixture
def many_open_files() -> Iterator[None]:
    """Room for thousands of sockets here and in the servers this test starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES:
        pytest.fail(f"this test needs {OPEN_FILES} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class ThreadCounter:
    """The thread count of a process, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ThreadCounter:
        self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._sampler.join(10)

    def _sample(self) -> None:
        while True:
            self.samples.append(self.process.num_threads())
            if self._stop.wait(0.02):
                return


# -- item 3: waiters hold no thread ----------------------------------------------------


def test_a_thousand_identical_requests_run_once_on_few_threads(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path, many_open_files: None
) -> None:
    server = live_server_factory()
    runs = tmp_path / "runs"
    request = post_request(
        "/api/command", orjson.dumps({"command": f"echo run >> {runs}; sleep 2; echo x"})
    )

    async def ask_all() -> list[Answer]:
        return await asyncio.gather(*(exchange(server.port, request) for _ in range(1000)))

    with ThreadCounter(server.process.pid) as threads:
        answers = asyncio.run(ask_all())
    assert runs.read_text() == "run\n"
    assert [answer.status for answer in answers] == [200] * 1000
    results = [answer.json() for answer in answers]
    assert {result["stdout"] for result in results} == {"x\n"}
    # Most of them waited on the one run, so the server held them all at once.
    assert sum(result["coalesced"] for result in results) >= 500
    assert len(threads.samples) >= 50, "sampled throughout the 2 s run"
    assert max(threads.samples) < 100, max(threads.samples)


# -- item 8: connections that do nothing cannot lock anyone out ------------------------

#: Header bytes a trickling client sends a byte a second: far more than a test lasts.
SLOW_HEADERS = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200


def test_idle_and_trickling_connections_lock_no_one_out(
    live_server_factory: Callable[..., LiveServer], many_open_files: None
) -> None:
    # The default timeouts (10 s for headers) hold every connection open for the test.
    server = live_server_factory()
    port = server.port
    hit = post_request("/api/command", orjson.dumps({"command": "echo hit"}))

    async def scenario() -> tuple[Answer, float, Answer, float]:
        assert (await exchange(port, hit)).json()["cached"] is False
        idle = [await asyncio.open_connection(HOST, port) for _ in range(1000)]
        sent = [asyncio.Event() for _ in range(200)]
        slow = [
            asyncio.create_task(trickle(port, SLOW_HEADERS, 1.0, two_sent=event)) for event in sent
        ]
        try:
            deadline = time.monotonic() + 10
            while server.connections() < 1200:
                assert time.monotonic() < deadline, "the server did not accept 1,200 connections"
                await asyncio.sleep(0.1)
            # Every trickler has sent two bytes (so each is mid-header, not merely connected).
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 30)
            cached, cached_seconds = await timed(exchange(port, hit))
            live, live_seconds = await timed(exchange(port, get_request("/livez")))
            assert server.connections() >= 1200, "the connections were held throughout"
            assert not any(task.done() for task in slow)
        finally:
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            for _, writer in idle:
                writer.close()
        return cached, cached_seconds, live, live_seconds

    cached, cached_seconds, live, live_seconds = asyncio.run(scenario())
    assert cached.status == 200 and cached.json()["cached"] is True
    assert live.status == 200 and live.json() == {"status": "ok"}
    assert cached_seconds < NO_LOCK_OUT_SECONDS and live_seconds < NO_LOCK_OUT_SECONDS


def test_idle_and_slow_connections_are_closed_after_their_timeouts(
    live_server_factory: Callable[..., LiveServer], many_open_files: None
) -> None:
    server = live_server_factory(
        "--header-timeout", "2", "--keepalive-timeout", "1", "--body-timeout", "1"
    )
    port = server.port

    async def idle_connection() -> float:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            return await time_to_close(reader, started)
        finally:
            writer.close()

    async def kept_alive() -> float:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(get_request("/livez", close=False))
            assert (await read_answer(reader)).status == 200
            return await time_to_close(reader, time.monotonic())
        finally:
            writer.close()

    async def slow_body() -> float:
        body = orjson.dumps({"command": "echo never"})
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(post_request("/api/command", body, close=False)[: -len(body)])
            started = time.monotonic()
            for index in range(len(body)):  # a byte every 0.25 s: 6 s for the whole body
                writer.write(body[index : index + 1])
                if await closed_within(reader, 0.25):
                    return time.monotonic() - started
            raise AssertionError("the server waited for the whole slow body")
        finally:
            writer.close()

    async def scenario() -> tuple[list[float], list[float], list[float], list[float]]:
        return await asyncio.gather(
            asyncio.gather(*(idle_connection() for _ in range(1000))),
            asyncio.gather(*(trickle(port, SLOW_HEADERS, 1.0) for _ in range(200))),
            asyncio.gather(*(kept_alive() for _ in range(20))),
            asyncio.gather(*(slow_body() for _ in range(20))),
        )

    idle, slow_headers, keep_alive, slow_bodies = asyncio.run(scenario())
    # Closed by the server's timers (never before them): 2 s for headers from
    # connecting, 1 s between kept-alive requests, 1 s for a body after its headers.
    # (time_to_close and trickle fail any connection still open 10 s on.)
    assert 1.5 <= min(idle) and max(idle) < 8
    assert 1.5 <= min(slow_headers) and max(slow_headers) < 8
    assert 0.5 <= min(keep_alive) and max(keep_alive) < 8
    assert 0.5 <= min(slow_bodies) and max(slow_bodies) < 8
    server.assert_quiet_log()
    assert asyncio.run(exchange(port, get_request("/livez"))).status == 200


# -- item 9: the body limit is enforced while reading ---------------------------------


async def send_spaces(writer: asyncio.StreamWriter, size: int) -> None:
    for _ in range(size // MiB):
        writer.write(b" " * MiB)
        await writer.drain()


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    live_server: LiveServer,
) -> None:
    port = live_server.port
    process = psutil.Process(live_server.process.pid)

    async def scenario() -> tuple[Answer, int, int]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            rss_before = process.memory_info().rss
            writer.write(
                b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n"
                b'{"command":'
            )
            # Read before sending the rest: the answer cannot wait for the body.
            answer = await asyncio.wait_for(read_answer(reader), 5)
            # Whatever of the declared body still comes is not kept (nor need it be read).
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(send_spaces(writer, 32 * MiB), 10)
            await asyncio.sleep(0.2)
            return answer, rss_before, process.memory_info().rss
        finally:
            writer.close()

    answer, rss_before, rss_after = asyncio.run(scenario())
    assert answer.status == 413
    assert answer.json() == {"error": "request body is larger than the limit of 1048576 bytes"}
    assert rss_after - rss_before < 16 * MiB, (rss_before, rss_after)
    live_server.assert_quiet_log()


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    limit = 100_000
    server = live_server_factory("--max-body-bytes", str(limit))
    chunk = b"x" * 10_000

    async def scenario() -> Answer:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(
                b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(limit // len(chunk)):  # exactly the limit: still acceptable
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            early = asyncio.ensure_future(read_answer(reader))
            done, _ = await asyncio.wait({early}, timeout=0.5)
            assert not done, "the server answered before the body passed the limit"
            writer.write(b"1\r\nx\r\n")  # one byte past it; the body is never finished
            return await asyncio.wait_for(early, 5)
        finally:
            writer.close()

    answer = asyncio.run(scenario())
    assert answer.status == 413
    assert answer.json() == {"error": f"request body is larger than the limit of {limit} bytes"}


# -- item 9: malformed HTTP gets a 4xx, never a 5xx ------------------------------------

MALFORMED = {
    "conflicting Content-Length": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
    "Content-Length and Transfer-Encoding": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "negative Content-Length": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: -1\r\n\r\n{}",
    "bad chunk size": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunk size past any integer": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}\r\n",
    "unknown Transfer-Encoding": b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Transfer-Encoding: gzip\r\n\r\n{}",
    "garbage request line": b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n",
    "unknown method": b"BREW /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "bad HTTP version": b"GET /livez HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    "header without a colon": b"GET /livez HTTP/1.1\r\nHost runcache\r\n\r\n",
    "non-ASCII in the path": b"GET /\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


def test_malformed_http_gets_a_4xx_json_error(live_server: LiveServer) -> None:
    port = live_server.port

    async def ask_all() -> dict[str, Answer]:
        answers = await asyncio.gather(*(exchange(port, raw) for raw in MALFORMED.values()))
        return dict(zip(MALFORMED, answers, strict=True))

    for case, answer in asyncio.run(ask_all()).items():
        assert 400 <= answer.status < 500, (case, answer)
        assert answer.headers["content-type"] == "application/json", (case, answer)
        error = answer.json()
        assert list(error) == ["error"] and isinstance(error["error"], str), (case, error)
    assert asyncio.run(exchange(port, get_request("/livez"))).json() == {"status": "ok"}
    live_server.assert_quiet_log()
