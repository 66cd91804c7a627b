"""Real ``runcache serve`` processes sharing one SQLite file or one Redis, and a Redis that dies.

Each test starts its servers with a namespace of its own, so the session Redis
never carries one test's entries or counts into another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from runcache.engine.cache import Cache
from runcache.errors import StoreError
from runcache.stores import open_store

from conftest import LiveServer, RedisServer, free_port

StartServer = Callable[..., LiveServer]


def run(server: LiveServer, command: str) -> dict[str, Any]:
    response = requests.post(server.url + "/api/command", json={"command": command}, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def get(server: LiveServer, path: str) -> dict[str, Any]:
    response = requests.get(server.url + path, timeout=30)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def clear(server: LiveServer) -> None:
    response = requests.post(server.url + "/api/cache/clear", timeout=30)
    assert response.json() == {"success": True, "message": "Cache cleared"}


def wait_for_status(server: LiveServer, status: str) -> dict[str, Any]:
    """Poll ``/health`` until it reports ``status``; fail after half a minute."""
    deadline = time.monotonic() + 30
    while True:
        health = get(server, "/health")
        if health["status"] == status or time.monotonic() > deadline:
            assert health["status"] == status, health
            return health
        time.sleep(0.1)


def test_two_servers_share_entries_stats_and_clear(
    live_server_factory: StartServer, shared_url: str
) -> None:
    one = live_server_factory("--store", shared_url)
    two = live_server_factory("--store", shared_url)
    first = run(one, "echo $$")
    second = run(two, "echo $$")
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["stdout"] == first["stdout"]
    for server in (one, two):
        stats = get(server, "/api/cache/stats")
        assert (stats["hits"], stats["misses"], stats["size"]) == (1, 1, 1)
        assert get(server, "/health")["status"] == "healthy"
    clear(two)
    assert run(one, "echo $$")["cached"] is False
    stats = get(two, "/api/cache/stats")
    assert (stats["hits"], stats["misses"], stats["size"]) == (0, 1, 1)


def test_sqlite_entries_and_stats_survive_a_restart(
    live_server_factory: StartServer, sqlite_url: str
) -> None:
    before = live_server_factory("--store", sqlite_url)
    first = run(before, "echo $$")
    assert before.stop() == 0
    after = live_server_factory("--store", sqlite_url)
    again = run(after, "echo $$")
    assert again["cached"] is True and again["stdout"] == first["stdout"]
    stats = get(after, "/api/cache/stats")
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 1, 1)


def test_identical_requests_on_two_servers_run_once(
    live_server_factory: StartServer, shared_url: str, tmp_path: Path
) -> None:
    one = live_server_factory("--store", shared_url)
    two = live_server_factory("--store", shared_url)
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; sleep 1; echo done"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda index: run((one, two)[index % 2], command), range(10)))
    assert runs.read_text() == "run\n"
    assert {answer["stdout"] for answer in answers} == {"done\n"}
    ran = [answer for answer in answers if not answer["cached"] and not answer["coalesced"]]
    assert len(ran) == 1
    stats = get(one, "/api/cache/stats")
    assert stats["coalesced"] == sum(answer["coalesced"] for answer in answers)


def test_redis_down_runs_uncached_and_degraded_then_recovers(
    live_server_factory: StartServer, redis_server: RedisServer, redis_url: str
) -> None:
    server = live_server_factory("--store", redis_url)
    run(server, "echo cached")
    assert run(server, "echo cached")["cached"] is True
    redis_server.stop()
    try:
        answers = [run(server, "echo cached") for _ in range(3)]
        assert [answer["cached"] for answer in answers] == [False] * 3
        assert answers[0]["stdout"] == "cached\n"
        health = wait_for_status(server, "degraded")
        assert "cache store failed" in health["reason"] and "redis" in health["reason"]
        assert get(server, "/api/cache/stats")["store_error"]
        failures = [line for line in server.output if "cache store failed" in line]
        assert len(failures) == 1, failures
    finally:
        redis_server.start()
    wait_for_status(server, "healthy")
    assert run(server, "echo cached")["cached"] is False
    assert run(server, "echo cached")["cached"] is True
    assert any("reachable again" in line for line in server.output)


def test_unusable_sqlite_file_starts_degraded_and_runs_uncached(
    live_server_factory: StartServer, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database at all" * 200)
    server = live_server_factory("--store", f"sqlite://{corrupt}")
    assert [run(server, "echo hi")["cached"] for _ in range(2)] == [False, False]
    health = wait_for_status(server, "degraded")
    assert "not a database" in health["reason"]
    corrupt.unlink()
    wait_for_status(server, "healthy")
    run(server, "echo hi")
    assert run(server, "echo hi")["cached"] is True


def test_cache_leaves_a_failed_store_alone_until_the_retry_interval(tmp_path: Path) -> None:
    port = free_port()
    resting = Cache(open_store(f"redis://127.0.0.1:{port}/0", 10, 1000), retry_interval=3600)
    eager = Cache(open_store(f"redis://127.0.0.1:{port}/0", 10, 1000), retry_interval=0)
    redis = RedisServer(port, tmp_path)

    async def outage_then_recovery() -> None:
        for cache in (resting, eager):
            assert await cache.lookup("k") is None
            reason = cache.degraded_reason
            assert reason is not None and "Error 111 connecting" in reason  # ECONNREFUSED
        redis.start()
        assert await resting.epoch() is None, "a resting cache must not try the store yet"
        with pytest.raises(StoreError):
            await resting.stats()
        assert await eager.epoch() == 0 and eager.degraded_reason is None
        stats = await eager.stats()
        assert stats.misses == 0, "the miss during the outage was never counted"
        for cache in (resting, eager):
            await cache.aclose()

    try:
        asyncio.run(outage_then_recovery())
    finally:
        resting.close()
        eager.close()
        redis.stop()


def test_server_starts_degraded_when_redis_is_unreachable(
    live_server_factory: StartServer,
) -> None:
    server = live_server_factory("--store", f"redis://127.0.0.1:{free_port()}/0")
    assert run(server, "echo hi")["stdout"] == "hi\n"
    health = wait_for_status(server, "degraded")
    assert "Connection refused" in health["reason"]
    # Nothing could be cleared, and saying "Cache cleared" would be a lie.
    cleared = requests.post(server.url + "/api/cache/clear", timeout=30)
    assert cleared.status_code == 503 and "Connection refused" in cleared.json()["error"]
