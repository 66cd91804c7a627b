"""Execution slots: a full server still serves hits, and refuses new runs with 503 Retry-After."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runcache.config import Config
from runcache.errors import Busy, ConfigError
from runcache.limits import RETRY_AFTER_SECONDS, Slots, waiting_limit
from runcache.service import Engine

ClientFactory = Callable[..., FlaskClient]

QUEUE_TIMEOUT = 0.2


def test_slots_count_holders_and_refuse_past_the_wait() -> None:
    slots = Slots(1, wait=0.01)
    with slots.hold():
        assert slots.held == 1
        with pytest.raises(Busy) as refused:
            with slots.hold():
                pass
        assert refused.value.retry_after == RETRY_AFTER_SECONDS
        assert "all 1 command slots stayed busy for 0.01s" in refused.value.message
    assert slots.held == 0
    with slots.hold():
        assert slots.held == 1


def test_past_the_waiting_limit_a_caller_is_refused_at_once() -> None:
    slots = Slots(1, wait=60, max_waiting=1)
    errors: list[Busy] = []

    def wait_for_a_slot() -> None:
        try:
            with slots.hold():
                pass
        except Busy as error:
            errors.append(error)

    with slots.hold():
        waiter = threading.Thread(target=wait_for_a_slot)
        waiter.start()
        while slots.waiting == 0:
            time.sleep(0.005)
        with pytest.raises(Busy, match="1 requests are waiting for one"):
            with slots.hold():
                pass
        assert waiter.is_alive()  # refused while the first waiter still waits
    waiter.join()
    assert errors == [] and slots.waiting == 0 and slots.held == 0


@pytest.mark.parametrize(
    ("threads", "slots", "limit"), [(64, 32, 24), (40, 32, 4), (33, 32, 1), (10, 1, 5)]
)
def test_waiting_limit_keeps_threads_for_hits(threads: int, slots: int, limit: int) -> None:
    assert waiting_limit(threads, slots) == limit


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"threads": 32}, r"threads \(32\) must be more than max_concurrent \(32\)"),
        ({"max_concurrent": 0}, "max_concurrent must be at least 1"),
        ({"queue_timeout": -1.0}, "queue_timeout must be at least 0"),
    ],
)
def test_bad_limits_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(settings, environ={})


def test_defaults_leave_threads_for_hits() -> None:
    config = Config.load(environ={})
    assert (config.max_concurrent, config.queue_timeout) == (32, 30.0)
    assert config.threads > config.max_concurrent


class Blocker:
    """A command that holds its slot until the test lets it finish."""

    def __init__(self, directory: Path) -> None:
        self.go = directory / "go"
        self.command = f"while [ ! -e {self.go} ]; do sleep 0.02; done; echo released"

    def release(self) -> None:
        self.go.touch()


def _post_in_thread(client: FlaskClient, command: str, answers: list[Any]) -> threading.Thread:
    own = client.application.test_client()  # one client per thread

    def post() -> None:
        response = own.post("/api/command", json={"command": command})
        answers.append((response.status_code, response.get_json()))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_full_slots_serve_hits_refuse_runs_and_let_identical_requests_share(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    client = client_factory(max_concurrent=1, threads=2, queue_timeout=QUEUE_TIMEOUT)
    engine: Engine = client.application.extensions["runcache"]
    assert client.post("/api/command", json={"command": "echo cached"}).status_code == 200
    blocker = Blocker(tmp_path)
    answers: list[Any] = []
    leader = _post_in_thread(client, blocker.command, answers)
    _wait_until(lambda: engine.slots.held == 1)
    waiter = _post_in_thread(client, blocker.command, answers)
    try:
        hit = client.post("/api/command", json={"command": "echo cached"})
        assert hit.status_code == 200 and hit.get_json()["cached"] is True

        for body in ({"command": "echo other"}, {"command": "echo cached", "use_cache": False}):
            busy = client.post("/api/command", json=body)
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
            assert "command slots stayed busy" in busy.get_json()["error"]
        # Longer than the queue timeout: a waiter that wanted a slot would have had its 503.
        time.sleep(QUEUE_TIMEOUT * 2)
    finally:
        blocker.release()
        leader.join()
        waiter.join()
    assert sorted((status, body["coalesced"], body["stdout"]) for status, body in answers) == [
        (200, False, "released\n"),
        (200, True, "released\n"),
    ]
    assert engine.slots.held == 0
    assert client.post("/api/command", json={"command": "echo other"}).status_code == 200


def test_request_body_and_timeout_limits_are_settings(client_factory: ClientFactory) -> None:
    client = client_factory(max_body_bytes=64, max_timeout=2.0, default_timeout=1.0)
    large = client.post("/api/command", json={"command": "echo " + "x" * 100})
    assert large.status_code == 413
    assert large.get_json() == {"error": "request body is larger than the limit of 64 bytes"}
    capped = client.post("/api/command", json={"command": "true", "timeout": 3})
    assert capped.status_code == 400
    assert capped.get_json() == {"error": "timeout must be at most 2 seconds"}
