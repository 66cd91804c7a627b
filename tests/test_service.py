"""The engine: one run per key shared by its callers, clears racing runs, and the cache key."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runcache.config import Config
from runcache.engine.cache import Cache
from runcache.engine.engine import KEY_ENV_VARS, Engine, Outcome
from runcache.errors import BadRequest, Busy
from runcache.run.encode import encode_result
from runcache.run.runner import Runner, RunResult
from runcache.stores import MemoryStore, open_store
from runcache.wire import CommandRequest


async def _until(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    """Wait on the loop until ``condition()`` holds; fail, not hang, after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_concurrent_identical_requests_run_once(engine: Engine, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    request = CommandRequest(f"echo run >> {runs}; sleep 0.5; echo done")

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(engine.execute(request) for _ in range(20)))

    outcomes = asyncio.run(main())
    assert runs.read_text() == "run\n"
    assert {outcome.result().stdout for outcome in outcomes} == {"done\n"}
    coalesced = sum(outcome.coalesced for outcome in outcomes)
    stats = asyncio.run(engine.cache_stats())
    # Requests that looked up after the run was stored got hits; the rest waited for it.
    assert coalesced + stats.hits == 19 and stats.coalesced == coalesced
    assert stats.hits + stats.misses == 20


def test_identical_refreshes_share_one_run_that_replaces_the_entry(
    engine: Engine, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; sleep 0.3; wc -l < {runs}"
    first = asyncio.run(engine.execute(CommandRequest(command)))
    refresh = CommandRequest(command, refresh=True)

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(engine.execute(refresh) for _ in range(10)))

    outcomes = asyncio.run(main())
    assert runs.read_text() == "run\n" * 2  # the first run, then one refresh for all ten
    assert {outcome.result().stdout for outcome in outcomes} == {"2\n"}
    assert sum(outcome.coalesced for outcome in outcomes) == 9
    hit = asyncio.run(engine.execute(CommandRequest(command)))
    assert (first.result().stdout, hit.cached, hit.result().stdout) == ("1\n", True, "2\n")


def test_uncached_requests_are_not_coalesced(engine: Engine, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    request = CommandRequest(f"echo run >> {runs}; sleep 0.2", use_cache=False)

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(engine.execute(request) for _ in range(3)))

    outcomes = asyncio.run(main())
    assert runs.read_text() == "run\n" * 3
    assert not any(outcome.coalesced or outcome.cached for outcome in outcomes)


def test_result_of_a_run_that_began_before_a_clear_is_returned_not_stored(
    engine: Engine, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    request = CommandRequest(f"while [ ! -e {gate} ]; do sleep 0.01; done; echo finished")

    async def main() -> tuple[Outcome, Outcome]:
        running = asyncio.ensure_future(engine.execute(request))
        await _until(lambda: engine.runner.running > 0)
        await engine.clear()
        gate.touch()
        first = await asyncio.wait_for(running, 15)
        assert (await engine.cache_stats()).size == 0
        return first, await engine.execute(request)

    first, again = asyncio.run(main())
    assert first.result().stdout == "finished\n"
    assert again.cached is False


def test_errors_are_shared_with_the_requests_that_joined(tmp_path: Path) -> None:
    """A run refused (every slot stayed busy) fails every request that joined it, once."""
    engine = Engine.from_config(
        Config.load({"max_concurrent": 1, "queue_timeout": 0.2}, environ={})
    )
    gate = tmp_path / "gate"
    blocker = CommandRequest(f"while [ ! -e {gate} ]; do sleep 0.01; done", use_cache=False)
    shared = CommandRequest("echo shared")

    async def main() -> list[BaseException | Outcome]:
        holding = asyncio.ensure_future(engine.execute(blocker))
        await _until(lambda: engine.runner.running > 0)
        answers = await asyncio.gather(
            *(engine.execute(shared) for _ in range(2)), return_exceptions=True
        )
        gate.touch()
        await asyncio.wait_for(holding, 15)
        return answers

    try:
        answers = asyncio.run(main())
        assert all(isinstance(answer, Busy) for answer in answers), answers
        refused = [job for job in engine.jobs.listing() if job.command == "echo shared"]
        assert len(refused) == 1 and refused[0].status == "failed"
    finally:
        engine.close()


def test_a_caller_going_away_cancels_neither_the_shared_run_nor_the_others_answer(
    engine: Engine, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    request = CommandRequest(f"while [ ! -e {gate} ]; do sleep 0.01; done; echo answer")

    async def main() -> Outcome:
        first = asyncio.ensure_future(engine.execute(request))
        await _until(lambda: engine.runner.running > 0)
        second = asyncio.ensure_future(engine.execute(request))
        job = engine.jobs.running_for(engine.cache_key(request.command))
        assert job is not None
        await _until(lambda: job.clients == 2)  # the second has joined the run
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert job.status == "running"  # the run goes on
        gate.touch()
        return await asyncio.wait_for(second, 15)

    shared = asyncio.run(main())
    assert shared.result().stdout == "answer\n" and shared.coalesced
    assert [job.status for job in engine.jobs.listing()] == ["completed"]


def test_the_last_caller_of_an_uncached_run_going_away_cancels_it(engine: Engine) -> None:
    request = CommandRequest("sleep 30", use_cache=False)

    async def main() -> None:
        waiting = asyncio.ensure_future(engine.execute(request))
        await _until(lambda: engine.runner.running > 0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        job = engine.jobs.listing()[0]
        await _until(lambda: job.ended)

    asyncio.run(main())
    assert [job.status for job in engine.jobs.listing()] == ["cancelled"]


def test_cache_key_depends_on_command_and_output_cap(config: Config) -> None:
    engine = Engine.from_config(config)
    capped = Engine.from_config(Config.load({"max_output_bytes": 10}, environ={}))
    try:
        assert engine.cache_key("echo a") == engine.cache_key("echo a")
        assert engine.cache_key("echo a") != engine.cache_key("echo b")
        assert engine.cache_key("echo a") != capped.cache_key("echo a")
    finally:
        engine.close()
        capped.close()


def test_cache_key_depends_on_working_directory(config: Config, tmp_path: Path) -> None:
    here = Engine(config, Cache(MemoryStore(10, 1000)), Runner(100))
    there = Engine(config, Cache(MemoryStore(10, 1000)), Runner(100, cwd=str(tmp_path)))
    try:
        assert here.cache_key("ls") != there.cache_key("ls")
    finally:
        here.close()
        there.close()


@pytest.mark.parametrize("name", KEY_ENV_VARS)
def test_cache_key_depends_on_each_variable_that_changes_what_commands_print(
    config: Config, name: str
) -> None:
    """PATH picks the programs, HOME and USER what they read, LANG, LC_ALL and TZ how
    they print: a server that sees another value must not answer with this one's result."""
    base = {variable: f"base-{variable}" for variable in KEY_ENV_VARS}
    engines = [
        Engine(config, Cache(MemoryStore(10, 1000)), Runner(100, env=environment))
        for environment in (base, {**base, name: "other"}, dict(base))
    ]
    try:
        same, other, again = (engine.cache_key("date") for engine in engines)
        assert same != other and same == again
    finally:
        for engine in engines:
            engine.close()


def test_bounds_come_from_the_config() -> None:
    engine = Engine.from_config(
        Config.load(
            {"max_timeout": 5, "default_timeout": 5, "max_ttl": 10, "default_ttl": 10}, environ={}
        )
    )
    try:
        with pytest.raises(BadRequest, match="timeout must be at most 5 seconds"):
            asyncio.run(engine.execute(CommandRequest("echo", timeout=6)))
        with pytest.raises(BadRequest, match="ttl must be at most 10 seconds"):
            asyncio.run(engine.execute(CommandRequest("echo", ttl=11)))
        assert engine.telemetry.snapshot().commands_executed == 0
    finally:
        engine.close()


def test_outcome_flags_are_appended_to_the_stored_body() -> None:
    body = b'{"stdout":"x"}'
    assert json.loads(Outcome(body, cached=True).to_json()) == {
        "stdout": "x",
        "cached": True,
        "coalesced": False,
    }
    assert json.loads(Outcome(body, coalesced=True).to_json())["coalesced"] is True
    assert json.loads(Outcome(body).to_json())["cached"] is False


def test_outcome_result_is_the_typed_answer() -> None:
    run = RunResult(
        bytearray(b"out\n"), bytearray(), 0, False, False, False, 0.25, "2026-01-01T00:00:00+00:00"
    )
    stored = encode_result(run, "ab" * 32)
    shared = Outcome(stored, coalesced=True).result()
    assert (shared.stdout, shared.cache_key, shared.success) == ("out\n", "ab" * 32, True)
    assert (shared.cached, shared.coalesced) == (False, True)
    hit = Outcome(stored, cached=True).result()
    assert (hit.cached, hit.coalesced) == (True, False)


def test_unknown_store_scheme_names_the_valid_ones() -> None:
    with pytest.raises(Exception, match="memory://"):
        open_store("ftp://x", 10, 100)


def test_a_cancelled_run_whose_leader_exited_0_is_not_cached(config: Config) -> None:
    """Under process-group containment the shell of ``sleep & echo`` exits 0 before the
    cancel kills its background child: the run is cancelled all the same, and not cached."""
    engine = Engine(
        config,
        Cache(MemoryStore(config.max_entries, config.max_bytes)),
        Runner(config.max_output_bytes, containment_mode="group"),
    )
    request = CommandRequest("sleep 30 & echo x")

    async def main() -> tuple[Outcome, Outcome]:
        running = asyncio.ensure_future(engine.execute(request))
        await _until(lambda: engine.jobs.running_for(engine.cache_key(request.command)) is not None)
        job = engine.jobs.running_for(engine.cache_key(request.command))
        assert job is not None
        await _until(lambda: job.stream("stdout") == b"x\n")  # the leader has printed and exits
        assert engine.cancel(job)
        cancelled = await asyncio.wait_for(running, 15)
        return cancelled, await engine.execute(request)

    try:
        cancelled, repeat = asyncio.run(main())
    finally:
        engine.close()
    first = cancelled.result()
    assert (first.cancelled, first.return_code, cancelled.cached) == (True, 0, False)
    assert (repeat.cached, repeat.result().cancelled) == (False, False)
