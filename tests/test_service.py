"""The engine: single flight, clears racing runs, and what goes into the cache key."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runcache.cache import Cache
from runcache.config import Config
from runcache.errors import BadRequest
from runcache.runner import Runner
from runcache.service import CommandRequest, Engine, Outcome
from runcache.singleflight import SingleFlight
from runcache.stores import MemoryStore, open_store


def test_concurrent_identical_requests_run_once(engine: Engine, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    request = CommandRequest(f"echo run >> {runs}; sleep 0.5; echo done")
    outcomes: list[Outcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(engine.execute(request)))
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs.read_text() == "run\n"
    assert {outcome.as_dict()["stdout"] for outcome in outcomes} == {"done\n"}
    coalesced = sum(outcome.coalesced for outcome in outcomes)
    stats = engine.cache_stats()
    # Threads that looked up after the run was stored got hits; the rest waited for it.
    assert coalesced + stats["hits"] == 19 and stats["coalesced"] == coalesced
    assert stats["hits"] + stats["misses"] == 20


def test_uncached_requests_are_not_coalesced(engine: Engine, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    request = CommandRequest(f"echo run >> {runs}; sleep 0.2", use_cache=False)
    threads = [threading.Thread(target=engine.execute, args=(request,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs.read_text() == "run\n" * 3


def test_result_of_a_run_that_began_before_a_clear_is_returned_not_stored(
    engine: Engine, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    request = CommandRequest(f"while [ ! -e {gate} ]; do sleep 0.01; done; echo finished")
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(engine.execute(request)))
    thread.start()
    while engine.runner.running == 0:
        time.sleep(0.01)
    engine.clear()
    gate.touch()
    thread.join()
    assert outcomes[0].as_dict()["stdout"] == "finished\n"
    assert engine.cache_stats()["size"] == 0
    assert engine.execute(request).cached is False


def test_singleflight_shares_errors_with_waiters() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls: list[int] = []
    errors: list[BaseException] = []

    def fail() -> int:
        calls.append(1)
        while flights.waiters("k") == 0:  # hold the flight open until the waiter joins
            time.sleep(0.005)
        raise ValueError("boom")

    def call() -> None:
        try:
            flights.run("k", fail)
        except ValueError as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(errors) == 2 and len(flights) == 0


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
    assert here.cache_key("ls") != there.cache_key("ls")


def test_bounds_come_from_the_config() -> None:
    engine = Engine.from_config(Config.load({"max_timeout": 5, "default_timeout": 5,
                                             "max_ttl": 10, "default_ttl": 10}, environ={}))
    try:
        with pytest.raises(BadRequest, match="timeout must be at most 5 seconds"):
            engine.execute(CommandRequest("echo", timeout=6))
        with pytest.raises(BadRequest, match="ttl must be at most 10 seconds"):
            engine.execute(CommandRequest("echo", ttl=11))
        assert engine.telemetry.as_dict()["commands_executed"] == 0
    finally:
        engine.close()


def test_outcome_flags_are_appended_to_the_stored_body() -> None:
    body = b'{"stdout":"x"}'
    assert Outcome(body, cached=True).as_dict() == {
        "stdout": "x", "cached": True, "coalesced": False}
    assert Outcome(body, coalesced=True).as_dict()["coalesced"] is True


def test_unknown_store_scheme_names_the_valid_ones() -> None:
    with pytest.raises(Exception, match="memory://"):
        open_store("ftp://x", 10, 100)
