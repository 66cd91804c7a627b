"""Execution slots: a full server still serves hits, and refuses new runs with 503 Retry-After."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.engine.slots import RETRY_AFTER_SECONDS, Slots
from runcache.errors import Busy, ConfigError

from conftest import until

ClientFactory = Callable[..., TestClient]

QUEUE_TIMEOUT = 0.2


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds; fail after ten seconds."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def _take(slots: Slots) -> AbstractAsyncContextManager[None]:
    """Hold a slot outside any ``async with``, so a test picks the moment it is let go."""
    holding = slots.hold()
    await holding.__aenter__()
    return holding


async def _let_go(holding: AbstractAsyncContextManager[None]) -> None:
    await holding.__aexit__(None, None, None)


def test_slots_count_holders_and_refuse_past_the_wait() -> None:
    slots = Slots(1, wait=0.01)

    async def main() -> None:
        async with slots.hold():
            assert slots.held == 1
            with pytest.raises(Busy) as refused:
                async with slots.hold():
                    pass
            assert refused.value.retry_after == RETRY_AFTER_SECONDS
            assert refused.value.headers == {"Retry-After": str(RETRY_AFTER_SECONDS)}
            assert "all 1 command slots stayed busy for 0.01s" in refused.value.message
        assert slots.held == 0
        async with slots.hold():
            assert slots.held == 1

    asyncio.run(main())
    assert slots.held == 0 and slots.waiting == 0


def test_a_waiter_is_refused_with_busy_after_the_wait_and_leaves_the_queue() -> None:
    slots = Slots(2, wait=0.3)

    async def main() -> float:
        first, second = await _take(slots), await _take(slots)
        started = time.monotonic()
        with pytest.raises(Busy) as refused:
            async with slots.hold():
                pass
        waited = time.monotonic() - started
        assert refused.value.retry_after == RETRY_AFTER_SECONDS
        assert "all 2 command slots stayed busy for 0.3s" in refused.value.message
        assert (slots.held, slots.waiting) == (2, 0)
        await _let_go(first)
        await _let_go(second)
        return waited

    waited = asyncio.run(main())
    assert 0.3 <= waited < 2
    assert (slots.held, slots.waiting) == (0, 0)


def test_turns_are_first_come_first_served_and_waiting_costs_no_thread() -> None:
    slots = Slots(1, wait=30)
    order: list[int] = []

    async def wait_for_a_turn(number: int) -> None:
        async with slots.hold():
            order.append(number)
            await asyncio.sleep(0)  # hold the slot across a turn of the loop

    async def main() -> int:
        holding = await _take(slots)
        waiters = []
        for number in range(500):
            waiters.append(asyncio.ensure_future(wait_for_a_turn(number)))
            await asyncio.sleep(0)  # each one queues before the next is made
        assert (slots.held, slots.waiting) == (1, 500)
        threads_while_waiting = threading.active_count()
        await _let_go(holding)
        # A newcomer while the queue is not empty takes no slot ahead of it.
        await wait_for_a_turn(500)
        await asyncio.gather(*waiters)
        return threads_while_waiting

    threads_before = threading.active_count()
    assert asyncio.run(main()) == threads_before
    assert order == list(range(501))
    assert (slots.held, slots.waiting) == (0, 0)


def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    slots = Slots(1, wait=30)
    order: list[str] = []

    async def wait_for_a_turn(name: str) -> None:
        async with slots.hold():
            order.append(name)

    async def main() -> None:
        holding = await _take(slots)
        gone = asyncio.ensure_future(wait_for_a_turn("gone"))
        kept = asyncio.ensure_future(wait_for_a_turn("kept"))
        await _until(lambda: slots.waiting == 2)
        gone.cancel()
        await _until(lambda: slots.waiting == 1)
        await _let_go(holding)
        await kept
        assert gone.cancelled()

    asyncio.run(main())
    assert order == ["kept"]
    assert (slots.held, slots.waiting) == (0, 0)


def test_a_waiter_cancelled_as_its_turn_came_passes_the_slot_on() -> None:
    slots = Slots(1, wait=30)
    order: list[str] = []

    async def wait_for_a_turn(name: str) -> None:
        async with slots.hold():
            order.append(name)

    async def main() -> None:
        holding = await _take(slots)
        gone = asyncio.ensure_future(wait_for_a_turn("gone"))
        kept = asyncio.ensure_future(wait_for_a_turn("kept"))
        await _until(lambda: slots.waiting == 2)
        await _let_go(holding)  # hands the slot to "gone", which has not woken yet
        assert (slots.held, slots.waiting) == (1, 1)
        gone.cancel()  # its client hung up just then: the slot goes on to "kept"
        await asyncio.wait_for(kept, 5)
        assert gone.cancelled()

    asyncio.run(main())
    assert order == ["kept"]
    assert (slots.held, slots.waiting) == (0, 0)


def test_slots_serve_several_event_loops_in_turn() -> None:
    """An engine outlives a test client's loop; its slots must work on the next one."""
    slots = Slots(1, wait=0.05)
    order: list[str] = []

    async def one_loop(name: str) -> None:
        holding = await _take(slots)

        async def waiter() -> None:
            async with slots.hold():
                order.append(name)

        queued = asyncio.ensure_future(waiter())
        await _until(lambda: slots.waiting == 1)
        await _let_go(holding)
        await asyncio.wait_for(queued, 10)
        async with slots.hold():  # and a wait that times out on this loop
            with pytest.raises(Busy):
                async with slots.hold():
                    pass

    for name in ("first loop", "second loop", "third loop"):
        asyncio.run(one_loop(name))
        assert (slots.held, slots.waiting) == (0, 0)
    assert order == ["first loop", "second loop", "third loop"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_concurrent": 0}, "max_concurrent must be at least 1"),
        ({"queue_timeout": -1.0}, "queue_timeout must be at least 0"),
    ],
)
def test_bad_limits_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(settings, environ={})


def test_default_limits() -> None:
    config = Config.load(environ={})
    assert (config.max_concurrent, config.queue_timeout) == (32, 30.0)
    # Connections are not slots: far more clients may wait or hit than commands run.
    assert config.max_connections >= 100 * config.max_concurrent


class Blocker:
    """A command that holds its slot until the test lets it finish."""

    def __init__(self, directory: Path) -> None:
        self.go = directory / "go"
        self.command = f"while [ ! -e {self.go} ]; do sleep 0.02; done; echo released"

    def release(self) -> None:
        self.go.touch()


def _post_in_thread(client: TestClient, command: str, answers: list[Any]) -> threading.Thread:
    # The test client hands each request to its one event loop, from any thread.
    def post() -> None:
        response = client.post("/api/command", json={"command": command})
        answers.append((response.status_code, response.json()))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_full_slots_serve_hits_refuse_runs_and_let_identical_requests_share(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    client = client_factory(max_concurrent=1, queue_timeout=QUEUE_TIMEOUT)
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    assert client.post("/api/command", json={"command": "echo cached"}).status_code == 200
    blocker = Blocker(tmp_path)
    answers: list[Any] = []
    leader = _post_in_thread(client, blocker.command, answers)
    until(lambda: engine.slots.held == 1, 30)
    waiter = _post_in_thread(client, blocker.command, answers)
    try:
        job = engine.jobs.running_for(engine.cache_key(blocker.command))
        assert job is not None
        until(lambda: job.clients == 2, 30)  # the leader and the identical request
        hit = client.post("/api/command", json={"command": "echo cached"})
        assert hit.status_code == 200 and hit.json()["cached"] is True

        for body in ({"command": "echo other"}, {"command": "echo cached", "use_cache": False}):
            busy = client.post("/api/command", json=body)
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
            assert "command slots stayed busy" in busy.json()["error"]
        # Longer than the queue timeout: a waiter that wanted a slot would have had its 503.
        time.sleep(QUEUE_TIMEOUT * 2)
    finally:
        blocker.release()
        leader.join(30)
        waiter.join(30)
    assert not leader.is_alive() and not waiter.is_alive(), "a request never answered"
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
    assert large.json() == {"error": "request body is larger than the limit of 64 bytes"}
    capped = client.post("/api/command", json={"command": "true", "timeout": 3})
    assert capped.status_code == 400
    assert capped.json() == {"error": "timeout must be at most 2 seconds"}
