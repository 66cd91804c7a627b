"""What the README and the docs claim, each tested where a small break of it would show.

Each test here was written against a breaking change tried by hand (issue 11):
the claim's code changed in one small way, the test failing on the changed code.
The docstring of each names the change it catches.
"""

from __future__ import annotations

import hmac
import json
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.run.runner import Runner

from conftest import LiveServer, until

StartServer = Callable[..., LiveServer]

MiB = 1 << 20
#: The page that says how a run and the cache behave.
BEHAVIOUR = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"


def _running(*argv: str) -> list[psutil.Process]:
    """The live processes whose command line is ``argv`` (found by what they run, not by
    a pid a command reports: a run may see pids of a namespace of its own)."""
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["cmdline"] == list(argv) and process.info["status"] != "zombie":
            found.append(process)
    return found


def _post(server: LiveServer, **body: object) -> requests.Response:
    return requests.post(server.url + "/api/command", json=body, timeout=30)


# -- a stop kills every running command's group ------------------------------------


def test_kill_all_kills_every_running_group() -> None:
    """Breaks with: kill only the first running group on shutdown."""
    runner = Runner(1024)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                runner.run(["/bin/sh", "-c", "sleep 60 & wait"], 60).return_code
            ),
            daemon=True,
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    until(lambda: runner.running == 3)
    runner.kill_all()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [-signal.SIGKILL] * 3, "a run outlived kill_all"


# -- SIGTERM: running commands killed, in-flight answers finished, exit 0 -----------


class _SlowReader:
    """A client that asks for a result and reads only its headers until told to go on,
    through a small receive window, so most of a large answer stays with the server."""

    def __init__(self, server: LiveServer, command: str) -> None:
        address = urlsplit(server.url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.settimeout(15)
        self.sock.connect((address.hostname, address.port))
        body = json.dumps({"command": command}).encode()
        self.sock.sendall(
            b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.received = b""
        self.length = 0

    def read_head(self) -> None:
        while b"\r\n\r\n" not in self.received:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed before its headers"
            self.received += chunk
        head, _, self.received = self.received.partition(b"\r\n\r\n")
        status, *fields = head.decode().split("\r\n")
        assert status.split()[1] == "200", status
        headers = dict(field.lower().split(": ", 1) for field in fields)
        self.length = int(headers["content-length"])

    def read_rest(self) -> dict[str, Any]:
        """The whole answer decoded; fails if the server stopped before sending it all."""
        parts = [self.received]
        got = len(self.received)
        while got < self.length:
            chunk = self.sock.recv(1 << 20)
            assert chunk, f"the answer stopped at {got} of {self.length} bytes"
            parts.append(chunk)
            got += len(chunk)
        self.sock.close()
        answer: dict[str, Any] = json.loads(b"".join(parts))
        return answer


#: A result large enough that most of its answer waits in the server for the reader.
LARGE = 16 * MiB
LARGE_COMMAND = f"head -c {LARGE} /dev/zero | tr '\\0' x"


def _large_result_server(start: StartServer) -> LiveServer:
    """A server holding the large result in its cache."""
    server = start("--max-output-bytes", str(2 * LARGE))
    answer = _post(server, command=LARGE_COMMAND).json()
    assert answer["success"] and len(answer["stdout"]) == LARGE
    return server


def test_a_stop_finishes_in_flight_answers_kills_commands_and_exits_0(
    live_server_factory: StartServer, tmp_path: Path
) -> None:
    """Breaks with: skip the kill in the SIGTERM handler (the server then waits its 10 s
    of grace for the long command), or exit at once on SIGTERM (the answers in flight
    are cut)."""
    server = _large_result_server(live_server_factory)
    streaming = _SlowReader(server, LARGE_COMMAND)
    streaming.read_head()  # a hit in flight: most of its 16 MiB is still to be sent
    started = tmp_path / "started"
    long_sleep = f"120.{uuid.uuid4().int % 10**6}"  # a sleep no other test runs
    answers: dict[str, requests.Response] = {}
    commands = {
        "long": f"sleep {long_sleep} & wait",
        "short": f"touch {started}; sleep 1; echo finished",
    }
    threads = [
        threading.Thread(
            target=lambda name=name, command=command: answers.__setitem__(
                name, _post(server, command=command)
            )
        )
        for name, command in commands.items()
    ]
    for thread in threads:
        thread.start()
    [sleeper] = until(lambda: _running("sleep", long_sleep))
    until(started.exists)

    server.process.send_signal(signal.SIGTERM)
    whole = streaming.read_rest()
    assert whole["cached"] is True and whole["stdout"] == "x" * LARGE
    for thread in threads:
        thread.join(8)
    # Each request waiting on a command got a whole answer: its command, killed.
    assert sorted(answers) == ["long", "short"], "a request in flight got no answer"
    for answer in answers.values():
        assert answer.status_code == 200
        assert (answer.json()["success"], answer.json()["timed_out"]) == (False, False)
    sleeper.wait(5)  # raises if the long command outlived the stop
    # Well within the 10 s of grace: nothing was left running to wait for.
    assert server.process.wait(8) == 0
    assert server.stop() == 0


# -- a large result is streamed -------------------------------------------------------


def test_a_large_result_is_streamed_so_slow_readers_cost_no_copy_of_it(
    live_server_factory: StartServer,
) -> None:
    """Breaks with: never stream large results (the whole answer joined into one body,
    which the server then holds for each reader until that reader takes it).

    Four readers that take nothing past the headers of a 16 MiB answer must not cost
    the server a copy each: streamed, each holds about a slice (256 KiB).
    """
    server = _large_result_server(live_server_factory)
    warm = _SlowReader(server, LARGE_COMMAND)  # one hit served before the baseline
    warm.read_head()
    assert warm.read_rest()["cached"] is True
    memory = psutil.Process(server.process.pid)
    baseline = memory.memory_info().rss
    readers = [_SlowReader(server, LARGE_COMMAND) for _ in range(4)]
    for reader in readers:
        reader.read_head()
    # Joined into one body, each answer is handed over whole as its headers go out;
    # streamed, each waits for its reader a slice at a time. Watch a while either way.
    grown = 0
    watch_until = time.monotonic() + 0.5
    while time.monotonic() < watch_until and grown < LARGE:
        grown = max(grown, memory.memory_info().rss - baseline)
        time.sleep(0.02)
    assert grown < LARGE, f"4 readers of a {LARGE >> 20} MiB answer cost {grown >> 20} MiB"
    for reader in readers:  # and every one gets the whole answer
        answer = reader.read_rest()
        assert answer["cached"] is True and answer["stdout"] == "x" * LARGE


# -- what goes into the cache key -------------------------------------------------------

#: The variables the documentation names as part of the key, spelled out here rather than
#: imported, so that emptying the code's list cannot empty this test too.
KEY_VARIABLES = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ")


def test_the_docs_name_these_variables_as_part_of_the_key() -> None:
    sentence = " ".join(BEHAVIOUR.read_text().split()).split("The cache key is", 1)[1][:300]
    assert "`PATH`, `HOME`, `USER`, `LANG`, `LC_ALL` and `TZ`" in sentence


@pytest.mark.parametrize("name", KEY_VARIABLES)
def test_each_variable_of_the_servers_environment_changes_the_key(
    config: Config, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Breaks with: leave PATH, HOME, USER, LANG, LC_ALL or TZ out of the cache key.

    Two servers whose environments differ only in ``name`` must not share results;
    two with the same environment must."""

    def key_under(value: str) -> str:
        monkeypatch.setenv(name, value)
        engine = Engine.from_config(config)
        try:
            return engine.cache_key("date")
        finally:
            engine.close()

    for variable in KEY_VARIABLES:
        monkeypatch.setenv(variable, f"base-{variable}")
    first, other, again = key_under(f"base-{name}"), key_under("other"), key_under(f"base-{name}")
    assert first != other and first == again


# -- the shared store's lock outlives the run it guards --------------------------------


def test_a_run_that_outlasts_its_timeout_keeps_the_lock_of_a_shared_store(
    live_server_factory: StartServer, tmp_path: Path
) -> None:
    """Breaks with: set the lock lease margin to zero.

    The lock on a shared store lapses on its own, so the run holding it must end
    within the lease: its timeout plus a margin for what comes after (the kill, the
    encoding, the store). A run paused for a while ends past its timeout by the
    clock; an identical request on another server meanwhile must wait for its
    result, not take the lapsed lock and run the command a second time.
    """
    store = f"sqlite://{tmp_path / 'shared.db'}"
    one, two = (live_server_factory("--store", store, "--queue-timeout", "0") for _ in range(2))
    runs = tmp_path / "runs"
    command, timeout = f"echo run >> {runs}; sleep 1; echo done", 1.5
    locked_at = time.monotonic()
    accepted = _post(one, command=command, timeout=timeout, background=True)
    assert accepted.status_code == 202, accepted.text
    until(runs.exists)
    paused = requests.post(f"{one.url}/api/jobs/{accepted.json()['job_id']}/pause", timeout=10)
    assert paused.json()["status"] == "paused", paused.text

    answers: list[requests.Response] = []
    waiter = threading.Thread(
        target=lambda: answers.append(_post(two, command=command, timeout=timeout))
    )
    waiter.start()
    # Paused until well past the lock's lease without a margin, then let it finish.
    time.sleep(max(0.0, locked_at + timeout + 1.0 - time.monotonic()))
    resumed = requests.post(f"{one.url}/api/jobs/{accepted.json()['job_id']}/resume", timeout=10)
    assert resumed.json()["status"] == "running", resumed.text
    waiter.join(20)
    assert [answer.status_code for answer in answers] == [200]
    assert answers[0].json()["stdout"] == "done\n"
    assert runs.read_text() == "run\n", "the second server ran the command again"


# -- tokens are compared in constant time -------------------------------------------------

TOKEN, ADMIN = "t" * 32, "a" * 32


def test_every_token_decision_is_the_constant_time_comparisons(
    client_factory: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks with: compare a token with ``==`` (any one of the comparisons).

    Timing cannot be seen from a test, but which comparison decides can: a
    ``compare_digest`` that matches stand-ins instead of the real tokens must decide
    every answer, so a comparison made any other way answers differently."""
    matches = {(b"stands-for-token", TOKEN.encode()), (b"stands-for-admin", ADMIN.encode())}

    def stand_in(presented: bytes | str, expected: bytes | str) -> bool:
        def raw(value: bytes | str) -> bytes:
            return value.encode() if isinstance(value, str) else bytes(value)

        return (raw(presented), raw(expected)) in matches

    client = client_factory(token=TOKEN, admin_token=ADMIN)
    monkeypatch.setattr(hmac, "compare_digest", stand_in)
    monkeypatch.setattr(secrets, "compare_digest", stand_in)
    for token, path, status in (
        ("stands-for-token", "/api/cache/stats", 200),
        ("stands-for-admin", "/api/cache/stats", 200),
        (TOKEN, "/api/cache/stats", 403),
        (ADMIN, "/api/cache/stats", 403),
        ("stands-for-admin", "/api/cache/clear", 200),
        ("stands-for-token", "/api/cache/clear", 403),
        (ADMIN, "/api/cache/clear", 403),
    ):
        method = client.post if path.endswith("clear") else client.get
        answer = method(path, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == status, (token, path, answer.text)
