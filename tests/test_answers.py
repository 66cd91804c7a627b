"""Answers that stay true (issue 20): the exit codes that are answers, on every store.

Each test runs an engine of its own over the memory store, a SQLite file and a real
redis-server, with real commands.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runcache.config import Config
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine, Outcome
from runcache.wire import RunRequest

from conftest import RedisServer

CALLER = Caller("test")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine over each store (a namespace of its own on the shared redis-server)."""
    if request.param == "memory":
        store = "memory://"
    elif request.param == "sqlite":
        store = f"sqlite:///{tmp_path / 'cache.db'}"
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        store = f"{redis.url}?namespace=answers-{uuid.uuid4().hex}"
    built = Engine.from_config(Config.load({"store": store}, environ={}))
    yield built
    built.close()


def _run(engine: Engine, request: RunRequest) -> Outcome:
    async def once() -> Outcome:
        try:
            return await engine.run(request, CALLER)
        finally:
            await engine.aclose()

    return asyncio.run(once())


def test_an_exit_code_named_an_answer_is_cached_and_others_are_not(
    engine: Engine, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    grep = f"echo run >> {runs}; grep -q needle /dev/null"  # finds nothing: exit 1
    named = RunRequest(grep, cache_exit_codes=[0, 1])
    first, second = _run(engine, named), _run(engine, named)
    assert first.result().return_code == second.result().return_code == 1
    assert (first.cached, second.cached) == (False, True)
    assert runs.read_text() == "run\n"

    # Without the code named, exit 1 is no answer: not stored, and not answered from
    # the entry the other request stored (a key of its own).
    plain = RunRequest(grep)
    assert [_run(engine, plain).cached for _ in range(2)] == [False, False]
    assert runs.read_text() == "run\n" * 3


def test_a_timed_out_run_is_never_cached_whatever_codes_are_named(engine: Engine) -> None:
    request = RunRequest("sleep 5", timeout=0.2, cache_exit_codes=list(range(256)))
    first, second = _run(engine, request), _run(engine, request)
    assert first.result().timed_out and second.result().timed_out
    assert (first.cached, second.cached) == (False, False)
