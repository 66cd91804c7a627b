"""Prometheus metrics: counters that a clear leaves alone, route templates, tokens, workers."""

from __future__ import annotations

import os
import platform
import signal
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
import requests
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from runcache import __version__
from runcache.engine.metrics import (
    BENCHMARK_OFF_ENV,
    REQUEST_BUCKETS,
    Metrics,
    NoMetrics,
    StoreCounts,
    outcome_of,
)
from runcache.run.runner import RunResult
from runcache.stores.base import CacheStats

from conftest import LiveServer, until

TOKEN = "metrics-token-0123456789abcdef"

#: Prints the pid of the worker that runs it (its shell's parent, read from /proc: the
#: machine's under --containment group; a run in namespaces sees a /proc of its own).
PARENT = "read -r pid comm state ppid rest < /proc/self/stat; echo $ppid"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scraped(response: requests.Response | httpx2.Response) -> Samples:
    """The samples of a ``GET /metrics`` answer, checked to be the Prometheus text format."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def scrape(client: TestClient) -> Samples:
    return scraped(client.get("/metrics"))


def scrape_live(url: str, **headers: str) -> Samples:
    return scraped(requests.get(url + "/metrics", headers=headers, timeout=10))


# -- in process ----------------------------------------------------------------


def test_hits_misses_and_runs_count_and_a_clear_resets_only_the_stats(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/api/command", json={"command": "echo hi"}).status_code == 200
    assert client.post("/api/command", json={"command": "exit 3"}).json()["return_code"] == 3
    before = scrape(client)
    assert value(before, "runcache_cache_hits_total") == 2
    assert value(before, "runcache_cache_misses_total") == 2
    assert value(before, "runcache_commands_total", outcome="success") == 1
    assert value(before, "runcache_commands_total", outcome="failure") == 1
    assert value(before, "runcache_command_duration_seconds_count") == 2
    assert value(before, "runcache_cache_entries") == 1
    assert value(before, "runcache_cache_bytes") > 0
    assert value(before, "runcache_running_commands") == 0

    assert client.post("/api/cache/clear").status_code == 200
    stats = client.get("/api/cache/stats").json()
    assert (stats["hits"], stats["misses"], stats["size"]) == (0, 0, 0)
    after = scrape(client)
    assert value(after, "runcache_cache_hits_total") == 2
    assert value(after, "runcache_cache_misses_total") == 2
    assert value(after, "runcache_cache_entries") == 0
    client.post("/api/command", json={"command": "echo hi"})
    client.post("/api/command", json={"command": "echo hi"})
    again = scrape(client)
    assert value(again, "runcache_cache_hits_total") == 3
    assert value(again, "runcache_cache_misses_total") == 3


def test_route_labels_are_templates_and_unknown_paths_one_label(client: TestClient) -> None:
    for job in ("abc", "def", "ghi"):
        assert client.get(f"/api/jobs/{job}").status_code == 404
    for path in ("/nope", "/nope/1", "/nope/2"):
        assert client.get(path).status_code == 404
    client.get("/livez")
    client.post("/livez")  # 405: still the route's template
    samples = scrape(client)
    routes = {
        dict(labels)["route"]
        for (name, labels) in samples
        if name == "runcache_http_request_duration_seconds_count"
    }
    assert routes == {"/api/jobs/{job_id}", "other", "/livez"}
    count = "runcache_http_request_duration_seconds_count"
    assert value(samples, count, route="/api/jobs/{job_id}", method="GET", code="404") == 3
    assert value(samples, count, route="other", method="GET", code="404") == 3
    assert value(samples, count, route="/livez", method="GET", code="200") == 1
    assert value(samples, count, route="/livez", method="POST", code="405") == 1


def test_streams_are_timed_apart_from_requests(client: TestClient) -> None:
    job = client.post("/api/command", json={"command": "echo followed", "background": True})
    job_id = job.json()["job_id"]
    until(lambda: client.get(f"/api/jobs/{job_id}").json()["status"] == "completed")
    with client.stream("GET", f"/api/jobs/{job_id}/events") as events:
        assert b"followed" in b"".join(events.iter_bytes())
    samples = scrape(client)
    events_route = "/api/jobs/{job_id}/events"
    assert value(samples, "runcache_http_stream_duration_seconds_count", route=events_route) == 1
    timed = {
        dict(labels)["route"]
        for (name, labels) in samples
        if name == "runcache_http_request_duration_seconds_count"
    }
    assert events_route not in timed and "/api/jobs/{job_id}" in timed


def test_build_process_and_python_figures_are_exposed(client: TestClient) -> None:
    samples = scrape(client)
    builds = [dict(labels) for (name, labels) in samples if name == "runcache_build_info"]
    assert builds == [{"version": __version__, "python": platform.python_version()}]
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert value(samples, "process_cpu_seconds_total") > 0
    assert any(name == "python_info" for (name, _) in samples)


def test_evictions_and_expirations_keep_rising_across_clears(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(max_entries=1)
    for n in range(3):
        client.post("/api/command", json={"command": f"echo {n}"})
    assert value(scrape(client), "runcache_cache_evictions_total") == 2
    client.post("/api/command", json={"command": "echo 3"})  # one more, not yet scraped
    client.post("/api/cache/clear")
    assert client.get("/api/cache/stats").json()["evictions"] == 0
    # More evictions after the clear (four) than the store counted before it (three): a
    # ledger that forgot the clear would see a rise of one, not four.
    for n in range(4, 9):
        client.post("/api/command", json={"command": f"echo {n}"})
    assert client.get("/api/cache/stats").json()["evictions"] == 4
    assert value(scrape(client), "runcache_cache_evictions_total") == 3 + 4


def test_store_counts_add_rises_and_take_a_drop_as_a_clear(tmp_path: Path) -> None:
    def stats(evictions: int, expirations: int = 0) -> CacheStats:
        return CacheStats(0, 0, evictions, expirations, 0, 0, 10, 0, 100)

    counts = StoreCounts(None)
    counts.observe(stats(3, 1))
    counts.observe(stats(5, 1))
    counts.observe(stats(2, 0))  # cleared elsewhere, then two more
    assert counts.totals() == {"evictions": 7, "expirations": 1}
    counts.observe(stats(4, 2), cleared=True)  # a clear here: what it reset counts
    counts.observe(stats(1, 0))
    assert counts.totals() == {"evictions": 10, "expirations": 3}
    # A clear here, then more than it reset with no reading between: all of them are new.
    counts.observe(stats(2, 0), cleared=True)
    counts.observe(stats(6, 0))
    assert counts.totals() == {"evictions": 10 + 1 + 6, "expirations": 3}

    # Two processes of one server share a ledger file: one store's rise counts once.
    first, second = StoreCounts(str(tmp_path / "ledger")), StoreCounts(str(tmp_path / "ledger"))
    first.observe(stats(4))
    second.observe(stats(4))
    second.observe(stats(6))
    first.observe(stats(6))
    assert first.totals() == second.totals() == {"evictions": 6, "expirations": 0}


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (RunResult(bytearray(), bytearray(), 0, False, False, False, 0.1, "t"), "success"),
        (RunResult(bytearray(), bytearray(), 3, False, False, False, 0.1, "t"), "failure"),
        (RunResult(bytearray(), bytearray(), -9, True, False, False, 0.1, "t"), "timeout"),
        (RunResult(bytearray(), bytearray(), -9, False, False, False, 0.1, "t", True), "cancelled"),
    ],
)
def test_each_run_has_one_outcome(result: RunResult, outcome: str) -> None:
    assert outcome_of(result) == outcome


def test_stale_hits_and_store_errors_count() -> None:
    metrics = Metrics()
    metrics.stale_hit()
    metrics.store_error()
    metrics.store_error()
    samples = parse(metrics.exposition(0, 0).decode())
    assert value(samples, "runcache_cache_stale_hits_total") == 1
    assert value(samples, "runcache_store_errors_total") == 2


def test_a_failing_store_counts_errors(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    database = tmp_path / "cache.db"
    client = client_factory(store=f"sqlite://{database}")
    client.post("/api/command", json={"command": "echo hi"})
    database.unlink()
    database.mkdir()  # where the file was, now nothing SQLite can open
    client.post("/api/command", json={"command": "echo other"})
    assert value(scrape(client), "runcache_store_errors_total") >= 1


# -- a real server ---------------------------------------------------------------


def test_a_live_server_counts_every_outcome_behind_its_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    refused = requests.get(server.url + "/metrics", timeout=10)
    assert refused.status_code == 401
    assert (
        requests.get(
            server.url + "/metrics",
            timeout=10,
            headers={"Authorization": "Bearer wrong-token-0123456789abcdef"},
        ).status_code
        == 403
    )

    def run(**body: object) -> dict[str, object]:
        answer = requests.post(server.url + "/api/command", json=body, headers=auth, timeout=30)
        assert answer.status_code in (200, 202), answer.text
        found: dict[str, object] = answer.json()
        return found

    run(command="echo ok")
    run(command="echo ok")
    assert run(command="exit 3")["return_code"] == 3
    assert run(command="sleep 5", timeout=0.2)["timed_out"] is True
    job = run(command="sleep 30", background=True)
    until(lambda: value(scrape_live(server.url, **auth), "runcache_running_commands") == 1)
    cancel = requests.post(
        f"{server.url}/api/jobs/{job['job_id']}/cancel", headers=auth, timeout=10
    )
    assert cancel.status_code == 200, cancel.text
    until(
        lambda: (
            requests.get(f"{server.url}/api/jobs/{job['job_id']}", headers=auth, timeout=10).json()[
                "status"
            ]
            == "cancelled"
        )
    )

    samples = scrape_live(server.url, **auth)
    outcomes = {
        outcome: value(samples, "runcache_commands_total", outcome=outcome)
        for outcome in ("success", "failure", "timeout", "cancelled")
    }
    assert outcomes == {"success": 1, "failure": 1, "timeout": 1, "cancelled": 1}
    assert value(samples, "runcache_cache_hits_total") == 1
    assert value(samples, "runcache_cache_misses_total") == 4
    assert value(samples, "runcache_running_commands") == 0
    assert value(samples, "runcache_command_duration_seconds_count") == 4
    assert (
        value(
            samples,
            "runcache_http_request_duration_seconds_count",
            route="/api/jobs/{job_id}/cancel",
            method="POST",
            code="200",
        )
        == 1
    )
    # The refused scrapes were timed too, under their route and their refusal's code.
    for refusal in ("401", "403"):
        assert (
            value(
                samples,
                "runcache_http_request_duration_seconds_count",
                route="/metrics",
                method="GET",
                code=refusal,
            )
            >= 1
        )


def test_two_workers_sum_into_every_scrape(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = live_server_factory(
        "--workers",
        "2",
        "--max-entries",
        "1",
        "--containment",
        "group",
        "--store",
        f"sqlite://{tmp_path / 'cache.db'}",
        env={"TMPDIR": str(temp)},
    )
    directories = list(temp.glob("runcache-metrics-*"))
    assert len(directories) == 1 and directories[0].stat().st_mode & 0o077 == 0

    # Each request on a connection of its own, so the kernel spreads them over both workers.
    workers: list[int] = []
    while len(set(workers)) < 2 or len(workers) < 20:
        assert len(workers) < 400, f"only worker {set(workers)} ever answered"
        answer = requests.post(
            server.url + "/api/command", timeout=30, json={"command": PARENT, "use_cache": False}
        )
        workers.append(int(answer.json()["stdout"]))
    for n in range(3):  # cacheable: a miss each (two evictions past --max-entries 1) ...
        requests.post(server.url + "/api/command", json={"command": f"echo {n}"}, timeout=30)
    hits = 0
    for _ in range(10):  # ... then hits of the last, on whichever worker takes each
        hits += requests.post(
            server.url + "/api/command", json={"command": "echo 2"}, timeout=30
        ).json()["cached"]

    for _ in range(20):  # every scrape, whichever worker answers it, shows the sums
        samples = scrape_live(server.url)
        assert value(samples, "runcache_commands_total", outcome="success") == len(workers) + 3
        assert value(samples, "runcache_cache_hits_total") == hits == 10
        assert value(samples, "runcache_cache_misses_total") == 3
        assert value(samples, "runcache_cache_evictions_total") == 2
        assert value(samples, "runcache_cache_entries") == 1
        assert (
            value(
                samples,
                "runcache_http_request_duration_seconds_count",
                route="/api/command",
                method="POST",
                code="200",
            )
            == len(workers) + 13
        )

    # A worker killed mid-run: its run stops counting as running, its counts stay.
    job = requests.post(
        server.url + "/api/command",
        timeout=30,
        json={"command": "sleep 30", "use_cache": False, "background": True},
    )
    job_id = job.json()["job_id"]

    def running() -> float:
        return value(scrape_live(server.url), "runcache_running_commands")

    until(lambda: running() == 1)
    # Jobs live in the worker that runs them: another worker answers 404 for this one.
    pids: list[int] = [job.json()["pid"]] if job.json()["pid"] else []

    def leader_known() -> bool:
        answer = requests.get(f"{server.url}/api/jobs/{job_id}", timeout=10)
        if answer.status_code == 200 and answer.json()["pid"]:
            pids.append(answer.json()["pid"])
        return bool(pids)

    until(leader_known)
    worker = _parent_of(pids[0])
    assert worker in workers
    os.kill(worker, signal.SIGKILL)
    until(lambda: running() == 0)
    samples = scrape_live(server.url)
    assert value(samples, "runcache_commands_total", outcome="success") == len(workers) + 3

    assert server.stop() == 0
    assert not directories[0].exists()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_each_engine_counts_apart() -> None:
    # A registry each: many engines in one process (tests, the CLI) never collide.
    first, second = Metrics(), Metrics()
    first.hit()
    assert value(parse(second.exposition(0, 0).decode()), "runcache_cache_hits_total") == 0


def test_metrics_off_for_benchmarks_count_nothing_and_leave_out_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(BENCHMARK_OFF_ENV, "1")
    off = Metrics.for_server(workers=1)
    assert isinstance(off, NoMetrics) and not off.enabled
    # Every call the engine makes is overridden: none reaches the metrics never made.
    public = {name for name in vars(Metrics) if not name.startswith("_")}
    assert public - {"enabled", "for_server"} <= set(vars(NoMetrics))
    monkeypatch.delenv(BENCHMARK_OFF_ENV)
    assert type(Metrics.for_server(workers=1)) is Metrics


def test_route_durations_read_as_prometheus_clients_own_histogram() -> None:
    """A lone process times requests in plain lists (RouteDurations); a scrape must
    show what prometheus_client's Histogram shows for the same requests, bounds and
    the bucket past the last one included."""
    registry = CollectorRegistry()
    histogram = Histogram(
        "runcache_http_request_duration_seconds",
        "How long HTTP requests took, by route template, method and status code.",
        ["route", "method", "code"],
        buckets=REQUEST_BUCKETS,
        registry=registry,
    )
    metrics = Metrics()
    command = ("/api/command", "POST", "200")
    requests_made = [(command, seconds) for seconds in (0.0, 0.0003, *REQUEST_BUCKETS)]
    requests_made += [
        (command, 301.0),
        (("/livez", "GET", "200"), 0.001),
        (("other", "GET", "404"), 0.00051),
        (("/api/command", "POST", "400"), 0.01),
    ]
    for labels, seconds in requests_made:
        metrics.request(labels, seconds)
        histogram.labels(*labels).observe(seconds)
    ours = {
        key: value
        for key, value in parse(metrics.exposition(0, 0).decode()).items()
        if key[0].startswith("runcache_http_request_duration_seconds")
    }
    theirs = parse(generate_latest(registry).decode())
    assert ours == theirs
