"""Worker pools as they are watched: ``GET /api/pools``, the ``runcache_pool_*`` gauges
of ``/metrics`` and the dashboard's Pools panel, against real ``runcache worker`` and
``runcache serve`` processes on a real redis-server (tests/pool_workers.py), and a
server without pools (a memory store) that shows none.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import requests
from playwright.sync_api import Page, expect
from prometheus_client.parser import text_string_to_metric_families

from test_dashboard import browser, driver, open_page  # noqa: F401 - the fixtures

from conftest import (
    LiveServer,
    RedisServer,
    free_port,
    json_object,
    marker,
    until,
)
from pool_workers import (  # noqa: F401 - deployment_fixture and deployment_watchdogs: fixtures
    Deployment,
    deployment_fixture,
    deployment_watchdogs,
    start_worker,
)

#: The figures of a pool, as ``GET /api/pools`` names them and ``/metrics`` suffixes them.
FIGURES = ("workers", "queued", "running")


def pools(server: LiveServer) -> dict[str, dict[str, Any]]:
    """``GET /api/pools``, by pool name."""
    answer = requests.get(server.url + "/api/pools", timeout=30)
    assert answer.status_code == 200, answer.text
    listed = json_object(answer)["pools"]
    assert [pool["pool"] for pool in listed] == sorted(pool["pool"] for pool in listed)
    return {pool["pool"]: pool for pool in listed}


def scraped_pools(server: LiveServer) -> dict[str, dict[str, Any]]:
    """The ``runcache_pool_*`` gauges of ``/metrics``, by pool, shaped as ``/api/pools``."""
    answer = requests.get(server.url + "/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    found: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(answer.text):
        figure = family.name.removeprefix("runcache_pool_")
        if figure == family.name:
            continue
        assert figure in FIGURES and family.type == "gauge", family
        for sample in family.samples:
            pool = sample.labels["pool"]
            found.setdefault(pool, {"pool": pool})[figure] = int(sample.value)
    return found


def _ended(server: LiveServer, job_id: str) -> bool | None:
    answer = requests.get(f"{server.url}/api/jobs/{job_id}", timeout=30).json()
    return answer["status"] != "running" or None


def counts(pool: str, workers: int, queued: int, running: int) -> dict[str, Any]:
    return {"pool": pool, "workers": workers, "queued": queued, "running": running}


def shows(server: LiveServer, wanted: dict[str, Any]) -> None:
    """Wait until ``GET /api/pools`` lists ``wanted`` for its pool."""
    until(lambda: pools(server).get(wanted["pool"]) == wanted, what=f"the pool as {wanted}")


def test_each_pools_live_workers_are_shown(deployment: Deployment) -> None:
    shown = pools(deployment.server)
    assert shown["alpha"] == counts("alpha", 2, 0, 0)
    assert shown["beta"] == counts("beta", 1, 0, 0)
    scraped = scraped_pools(deployment.server)
    assert scraped["alpha"] == shown["alpha"] and scraped["beta"] == shown["beta"]


def test_a_run_and_one_queued_behind_it_are_counted(deployment: Deployment, tmp_path: Path) -> None:
    """Each run waits for a gate of its own, so the figures step through 1 running and 1
    queued, 1 running and none queued, then none."""
    pool = "solo-" + marker()[:8]
    gates = [tmp_path / "first", tmp_path / "second"]
    worker = start_worker(deployment.store, pool, "--concurrency", "1")
    try:
        for gate in gates:
            answer = requests.post(
                deployment.server.url + "/api/command",
                json={
                    "command": f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {gate.name}",
                    "pool": pool,
                    "background": True,
                },
                timeout=30,
            )
            assert answer.status_code == 202, answer.text
        # (the gate opened next, queued, running)
        steps: list[tuple[Path | None, int, int]] = [(gates[0], 1, 1), (gates[1], 0, 1)]
        for opened, queued, running in [*steps, (None, 0, 0)]:
            wanted = counts(pool, 1, queued, running)
            shows(deployment.server, wanted)
            assert scraped_pools(deployment.server)[pool] == wanted
            if opened is not None:
                opened.touch()
    finally:
        worker.stop()
    assert pools(deployment.server)[pool] == counts(pool, 0, 0, 0)  # it left the pool


def test_a_server_without_pools_shows_none(live_server: LiveServer) -> None:
    answer = requests.get(live_server.url + "/api/pools", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"pools": []}
    scrape = requests.get(live_server.url + "/metrics", timeout=30)
    assert scrape.status_code == 200
    assert "runcache_cache_entries" in scrape.text
    assert "runcache_pool_" not in scrape.text


def test_redis_gone_leaves_metrics_answering_and_pools_a_503(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    redis = RedisServer(free_port(), tmp_path)
    redis.start()
    try:
        store = f"{redis.url}?namespace=gone"
        worker = start_worker(store, "lonely")
        try:
            server = live_server_factory("--store", store, "--store-timeout", "1")
            assert scraped_pools(server) == {"lonely": counts("lonely", 1, 0, 0)}
        finally:
            worker.stop()
        redis.stop()
        for _ in range(2):
            scrape = requests.get(server.url + "/metrics", timeout=30)
            assert scrape.status_code == 200, scrape.text
            assert "runcache_cache_entries" in scrape.text
            assert "runcache_pool_" not in scrape.text
        answer = requests.get(server.url + "/api/pools", timeout=30)
        assert answer.status_code == 503
        assert answer.json()["error"].startswith(f"worker pools on {redis.url}")
        server.logged(lambda line: "worker pools unreadable" in line)
        assert sum("worker pools unreadable" in line for line in server.output) == 1
    finally:
        redis.stop()


def test_the_dashboard_shows_each_pool_and_a_queued_job_as_queued(
    deployment: Deployment,
    open_page: Callable[..., Page],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    page = open_page(deployment.server)
    try:
        expect(page.locator("#pools-panel")).to_be_visible()
        for pool, workers in (("alpha", "2"), ("beta", "1")):
            row = page.locator(f'#pools tr[data-pool="{pool}"]')
            expect(row.locator("td.pool")).to_have_text(pool)
            expect(row.locator("td.workers")).to_have_text(workers)
            expect(row.locator("td.queued")).to_have_text("0")
            expect(row.locator("td.running")).to_have_text("0")
        # A pool of one worker of concurrency 1: the second job waits in its queue.
        pool, gate = "solo-" + marker()[:8], tmp_path / "gate"
        worker = start_worker(deployment.store, pool, "--concurrency", "1")
        try:
            jobs = [
                requests.post(
                    deployment.server.url + "/api/command",
                    json={
                        "command": f"while [ ! -e {gate} ]; do sleep 0.05; done # {n}",
                        "pool": pool,
                        "background": True,
                    },
                    timeout=30,
                ).json()["job_id"]
                for n in range(2)
            ]
            badges = [page.locator(f'#running tr[data-job-id="{j}"] .badge') for j in jobs]
            expect(badges[0].first).to_have_text("running")
            expect(badges[1].first).to_have_text("queued")
            gate.touch()
            for job_id in jobs:
                until(partial(_ended, deployment.server, job_id), what="the gated jobs")
        finally:
            worker.stop()
    finally:
        page.close()


def test_the_dashboard_has_no_pools_panel_without_pools(
    live_server: LiveServer,
    open_page: Callable[..., Page],  # noqa: F811 - the fixture
) -> None:
    page = open_page(live_server)
    expect(page.locator("#health")).to_contain_text("healthy")
    expect(page.locator("#stat-size")).to_have_text("0")  # the refresh has answered
    expect(page.locator("#pools-panel")).to_be_hidden()
    expect(page.locator("#pools tbody tr")).to_have_count(0)
