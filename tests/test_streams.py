"""End to end: request heads past their bound, and event streams whose readers read nothing.

Real ``runcache serve`` processes and raw loopback sockets. The new settings are
given in the environment (``RUNCACHE_*``) rather than as flags, so that the
same test run against a server without them starts it and fails on what it
does, not on an unknown flag.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import httpx
import orjson
import psutil

from conftest import LiveServer, until

HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB

#: A job's output the streams follow: as large as the issue's.
OUTPUT_BYTES = 16 * MiB

#: Seconds a raw socket waits on the server before the test gives up on it.
SOCKET_TIMEOUT = 30.0


def _connect(server: LiveServer) -> socket.socket:
    return socket.create_connection((HOST, server.port), timeout=SOCKET_TIMEOUT)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of an answer with a Content-Length, read to the end."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before an answer's head: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    while len(body) < int(headers["content-length"]):
        piece = sock.recv(65536)
        assert piece, "closed in the middle of an answer's body"
        body += piece
    return int(status_line.split()[1]), headers, body


class Sampler:
    """A reading of a process, taken every 20 ms while the block runs; keeps every value."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _sample(self) -> None:
        while True:
            self.samples.append(self.read())
            if self._stop.wait(0.02):
                return


# -- item 2: a request's head has a bound in bytes -----------------------------------------


def _pad_lines(size: int) -> bytes:
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    return line * (size // len(line))


def test_headers_past_the_bound_get_a_431_and_the_connection_closes(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={"RUNCACHE_MAX_HEADER_BYTES": str(16 * KiB)})
    with _connect(server) as sock:  # just under the bound: answered
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n" + _pad_lines(15 * KiB) + b"\r\n")
        assert _read_answer(sock)[0] == 200
    with _connect(server) as sock:  # a body is no header: 200 KiB of it in the same writes
        body = orjson.dumps({"command": "cat", "stdin": "x" * (200 * KiB)})
        sock.sendall(
            b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        status, _, answer = _read_answer(sock)
        assert status == 200 and len(orjson.loads(answer)["stdout"]) == 200 * KiB
    for head in (
        b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n" + _pad_lines(20 * KiB),
        b"GET /livez?" + b"q" * (20 * KiB) + b" HTTP/1.1\r\n",
    ):  # the URL counts too
        with _connect(server) as sock:
            sock.sendall(head)
            status, headers, answer = _read_answer(sock)
            assert (status, headers["connection"]) == (431, "close")
            assert orjson.loads(answer) == {
                "error": f"request headers larger than {16 * KiB} bytes (--max-header-bytes)"
            }
            assert sock.recv(65536) == b""  # closed
    server.assert_quiet_log()


def _flood(server: LiveServer, total: int) -> int:
    """Send endless headers, at most ``total`` bytes, until the server stops taking them."""
    chunk = _pad_lines(MiB)
    sent = 0
    with _connect(server) as sock:
        sock.sendall(b"GET /api/cache/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):  # the server closed: refused, as it should
            for _ in range(total // len(chunk)):
                sock.sendall(chunk)
                sent += len(chunk)
    return sent


def test_endless_headers_cannot_grow_the_server(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={"RUNCACHE_TOKEN": "a-token-of-thirty-two-characters"})
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    sent: list[int] = []
    with Sampler(lambda: process.memory_info().rss) as rss:
        floods = [
            threading.Thread(target=lambda: sent.append(_flood(server, 200 * MiB)))
            for _ in range(3)
        ]
        for flood in floods:
            flood.start()
        for flood in floods:
            flood.join(300)
    assert len(sent) == 3, "a flood never ended"
    assert max(rss.samples) - before < 64 * MiB, (
        f"the server grew by {(max(rss.samples) - before) / MiB:.0f} MiB "
        f"taking {sum(sent) / MiB:.0f} MiB of headers"
    )
    assert sum(sent) < 3 * 10 * MiB, "the server kept taking headers"
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    server.assert_quiet_log()


# -- item 4: streams share the loop, drop readers that take nothing, leave room ------------


def _ended_job(server: LiveServer) -> str:
    """A job that printed OUTPUT_BYTES and has ended."""
    command = f"yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c {OUTPUT_BYTES}"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        accepted = http.post("/api/command", json={"command": command, "background": True})
        assert accepted.status_code == 202, accepted.text
        job_id: str = accepted.json()["job_id"]
        until(
            lambda: http.get(f"/api/jobs/{job_id}").json()["status"] == "completed",
            30,
            "the job's end",
        )
    return job_id


def _stream_request(job_id: str) -> bytes:
    return b"GET /api/jobs/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % job_id.encode()


def _has_data(sock: socket.socket) -> bool:
    """Whether the server has sent something, read without taking it."""
    with contextlib.suppress(BlockingIOError):
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    return False


@contextlib.contextmanager
def _readers(server: LiveServer, job_id: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections following the job that never read; closed together after."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _connect(server)
            sockets.append(sock)
            sock.sendall(_stream_request(job_id))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _livez_seconds(server: LiveServer) -> float:
    started = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert _read_answer(sock)[0] == 200
    return time.monotonic() - started


def test_livez_answers_while_readers_that_read_nothing_follow_a_large_job_and_hang_up(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory("--max-output-bytes", str(4 * OUTPUT_BYTES))
    job_id = _ended_job(server)
    livez = Sampler(lambda: _livez_seconds(server))
    try:
        with _readers(server, job_id, 140) as readers:
            # (Their 140 requests, all at once, are answered before a request behind them.)
            until(lambda: all(_has_data(sock) for sock in readers), 60, "every stream's start")
            livez.start()
            until(lambda: len(livez.samples) >= 5, 30, "livez while the streams are written")
        # hung up together
        until(lambda: server.connections() == 0, 60, "the hung-up streams' end")
        count = len(livez.samples)
        until(lambda: len(livez.samples) > count + 5, 30, "livez after the hang-up")
    finally:
        livez.stop()
    assert max(livez.samples) < 0.5, f"/livez took {max(livez.samples):.2f} s at worst"
    server.assert_quiet_log()


def test_a_reader_that_takes_nothing_is_dropped_after_the_write_timeout(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(
        "--max-output-bytes", str(4 * OUTPUT_BYTES), env={"RUNCACHE_WRITE_TIMEOUT": "1"}
    )
    job_id = _ended_job(server)
    with _readers(server, job_id, 5) as readers:
        until(lambda: all(_has_data(sock) for sock in readers), 30, "every stream's start")
        until(lambda: server.connections() == 0, 20, "the dropped streams")
        with httpx.Client(base_url=server.url, timeout=30) as http:  # a reader who reads
            with http.stream("GET", f"/api/jobs/{job_id}/events") as events:
                size = sum(len(chunk) for chunk in events.iter_bytes())
            assert size > OUTPUT_BYTES and events.status_code == 200
    server.assert_quiet_log()


def test_streams_that_read_nothing_never_keep_ordinary_requests_out(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(
        "--max-output-bytes", str(4 * OUTPUT_BYTES), "--max-connections", "20"
    )
    job_id = _ended_job(server)
    with _readers(server, job_id, 19) as readers:
        until(lambda: all(_has_data(sock) for sock in readers), 30, "every stream's answer")
        heads = [sock.recv(4096, socket.MSG_PEEK).split(b"\r\n")[0] for sock in readers]
        assert heads.count(b"HTTP/1.1 200 OK") == 10  # half of --max-connections
        refused = [sock for sock, head in zip(readers, heads, strict=True) if b" 503 " in head]
        assert len(refused) == 9
        status, headers, body = _read_answer(refused[0])
        assert headers["retry-after"] == "5" and "--max-streams" in orjson.loads(body)["error"]
        for _ in range(20):  # one at a time, as they come
            with _connect(server) as sock:
                sock.sendall(
                    b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                assert _read_answer(sock)[0] == 200
    with httpx.Client(base_url=server.url, timeout=30) as http:  # the places are free again

        def admitted() -> bool:
            with http.stream("GET", f"/api/jobs/{job_id}/events") as events:
                return events.status_code == 200

        until(admitted, 15, "a stream admitted once the others hung up")
    server.assert_quiet_log()
