"""What the server keeps for its dashboard: the cache's counts over time, and its slots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from runcache import wire
from runcache.engine.history import History

from conftest import LiveServer, until


def _stats(hits: int, misses: int) -> wire.CacheStats:
    return wire.CacheStats(hits, misses, 0, 0, 0, 0, 10, 0, 100, "0.0%", 0.0)


def test_the_ring_keeps_the_newest_samples_oldest_first() -> None:
    moments = iter([10.0, 15.0, 20.0])
    history = History(interval=5, size=2, clock=lambda: next(moments))
    for hits in (1, 2, 3):
        history.record(_stats(hits, 1))
    answer = history.answer()
    assert answer.interval == 5
    assert answer.samples == [wire.HitSample(15.0, 2, 1), wire.HitSample(20.0, 3, 1)]


def test_a_server_samples_its_counts_from_the_start(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory()
    with httpx.Client(base_url=server.url, timeout=15) as http:
        first = until(lambda: http.get("/api/cache/history").json()["samples"], what="a sample")
        assert first[0]["hits"] == 0 and first[0]["misses"] == 0
        for _ in range(2):  # a miss, then a hit
            assert http.post("/api/command", json={"command": "echo sampled"}).is_success
        counted = until(
            lambda: [s for s in http.get("/api/cache/history").json()["samples"] if s["hits"]],
            seconds=20,
            what="a sample with the hit",
        )
        assert (counted[0]["hits"], counted[0]["misses"]) == (1, 1)
        assert counted[0]["at"] > first[0]["at"]


def test_health_shows_the_slots_in_use_and_the_queue(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server_factory("--max-concurrent", "1")
    gate = tmp_path / "gate"
    wait = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    with httpx.Client(base_url=server.url, timeout=15) as http:
        assert http.get("/health").json()["slots"] == {"size": 1, "in_use": 0, "queued": 0}
        for n in range(2):
            body = {"command": f"{wait}; echo {n}", "use_cache": False, "background": True}
            assert http.post("/api/command", json=body).status_code == 202
        until(
            lambda: http.get("/health").json()["slots"] == {"size": 1, "in_use": 1, "queued": 1},
            what="one run in the slot and one waiting",
        )
        gate.touch()
        until(
            lambda: http.get("/health").json()["slots"] == {"size": 1, "in_use": 0, "queued": 0},
            what="the slot freed",
        )
