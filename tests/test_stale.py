"""Stale-while-revalidate: a result past its expiry answers at once, marked stale,
while one run refreshes it (one per key, across servers sharing a store)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from starlette.testclient import TestClient

from conftest import LiveServer, until

#: A fresh value each run, and long enough that requests overlap its refresh.
UUID = "cat /proc/sys/kernel/random/uuid; sleep 0.3"


def _expired(client: TestClient, command: str) -> bool:
    """Whether no live entry holds ``command`` (listing counts no hit or miss)."""
    return not client.get("/api/cache/entries", params={"prefix": command}).json()["entries"]


def _no_job_running(client: TestClient) -> bool:
    return all(job["status"] != "running" for job in client.get("/api/jobs").json()["jobs"])


def test_a_stale_result_answers_at_once_and_one_run_refreshes_it(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory()
    first = client.post("/api/command", json={"command": UUID, "ttl": 0.3}).json()
    until(lambda: _expired(client, UUID))
    answers = [
        client.post("/api/command", json={"command": UUID, "stale": 60}).json() for _ in range(5)
    ]
    assert answers[0]["stale"] is True and answers[0]["cached"] is True
    assert answers[0]["stdout"] == first["stdout"]
    until(lambda: _no_job_running(client))
    fresh = client.post("/api/command", json={"command": UUID}).json()
    assert fresh["cached"] is True and "stale" not in fresh
    assert fresh["stdout"] != first["stdout"]
    # The first run and one refresh, however many stale answers were given meanwhile.
    assert client.get("/api/telemetry").json()["commands_executed"] == 2
    stats = client.get("/api/cache/stats").json()
    stale_answers = sum(1 for answer in answers if answer.get("stale"))
    assert stats["stale_hits"] == stale_answers >= 1
    assert stats["hits"] == 6  # the stale answers count as hits too, and the fresh one


def test_without_stale_an_expired_result_is_run_again(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory()
    first = client.post("/api/command", json={"command": UUID, "ttl": 0.3}).json()
    until(lambda: _expired(client, UUID))
    again = client.post("/api/command", json={"command": UUID, "stale": 0}).json()
    assert again["cached"] is False and again["stdout"] != first["stdout"]
    assert client.get("/api/cache/stats").json()["stale_hits"] == 0


def test_default_stale_answers_requests_that_do_not_say(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(default_stale=60.0)
    first = client.post("/api/command", json={"command": UUID, "ttl": 0.3}).json()
    until(lambda: _expired(client, UUID))
    answer = client.post("/api/command", json={"command": UUID}).json()
    assert (answer["stale"], answer["stdout"]) == (True, first["stdout"])
    until(lambda: _no_job_running(client))


@pytest.mark.parametrize(
    ("stale", "message"),
    [
        (-1, "stale must be 0 or more seconds"),
        ("soon", "stale must be a number of seconds"),
        (3601, "stale must be at most 3600 seconds"),
    ],
)
def test_a_bad_stale_is_a_400_that_runs_nothing(
    client: TestClient, stale: object, message: str
) -> None:
    answer = client.post("/api/command", json={"command": "echo x", "stale": stale})
    assert answer.status_code == 400 and answer.json()["error"] == message
    assert client.get("/api/telemetry").json()["commands_executed"] == 0


def test_default_stale_past_max_stale_is_refused_at_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--default-stale", "10", "--max-stale", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")},
    )
    assert done.returncode == 2 and "--default-stale must not exceed --max-stale" in done.stderr


def test_servers_sharing_a_store_refresh_a_stale_result_once(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; cat /proc/sys/kernel/random/uuid; sleep 0.5"
    store = f"sqlite:///{tmp_path / 'cache.db'}"
    servers = [live_server_factory("--store", store) for _ in range(2)]
    first = requests.post(
        f"{servers[0].url}/api/command", json={"command": command, "ttl": 0.3}, timeout=30
    ).json()

    def expired() -> bool:
        found = requests.get(
            f"{servers[0].url}/api/cache/entries", params={"prefix": "echo run"}, timeout=30
        ).json()
        return not found["entries"]

    until(expired)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda url: requests.post(
                    f"{url}/api/command", json={"command": command, "stale": 60}, timeout=30
                ).json(),
                [server.url for server in servers] * 4,
            )
        )
    stale = [answer for answer in answers if answer.get("stale")]
    assert stale and all(answer["stdout"] == first["stdout"] for answer in stale)

    def refreshed() -> bool:
        found = requests.post(
            f"{servers[1].url}/api/command", json={"command": command}, timeout=30
        ).json()
        return bool(found["cached"] and found["stdout"] != first["stdout"])

    # Asked without stale only once the refresh has stored (a miss would run it again).
    until(lambda: not expired() and refreshed())
    assert runs.read_text().splitlines() == ["run", "run"]  # the first run, one refresh


def test_runcache_run_stale_answers_an_expired_result(live_server: LiveServer) -> None:
    def run(*flags: str) -> bytes:
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("runcache")),
                "run",
                "--server",
                live_server.url,
                *flags,
                "--",
                "cat",
                "/proc/sys/kernel/random/uuid",
            ],
            capture_output=True,
            timeout=60,
            check=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")},
        )
        return done.stdout

    first = run("--ttl", "0.3")

    def expired() -> bool:
        found = requests.get(
            f"{live_server.url}/api/cache/entries", params={"prefix": "cat /proc"}, timeout=30
        ).json()
        return not found["entries"]

    until(expired)
    assert run("--stale", "60") == first
    until(lambda: not expired())  # the refresh stored a new result
    assert run() != first


def test_a_background_request_and_its_job_say_the_answer_was_stale(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory()
    client.post("/api/command", json={"command": UUID, "ttl": 0.3})
    until(lambda: _expired(client, UUID))
    accepted = client.post("/api/command", json={"command": UUID, "stale": 60, "background": True})
    assert accepted.status_code == 202, accepted.text
    job = client.get(f"/api/jobs/{accepted.json()['job_id']}").json()
    assert job["result"]["cached"] is True and job["result"]["stale"] is True
    until(lambda: _no_job_running(client))


def test_a_request_without_stale_leaves_the_expired_result_to_those_with_it(
    client_factory: Callable[..., TestClient],
    tmp_path: Path,
) -> None:
    """A request that does not accept stale answers misses and runs the command; one
    that does, while that run goes on, still gets the stale answer at once (it once
    found the result removed by the first, and waited for the run)."""
    ran, gate = tmp_path / "ran", tmp_path / "gate"
    command = (
        f"cat /proc/sys/kernel/random/uuid; if [ -e {ran} ]; then "
        f"while [ ! -e {gate} ]; do sleep 0.02; done; fi; touch {ran}"
    )
    client = client_factory()
    first = client.post("/api/command", json={"command": command, "ttl": 0.3}).json()
    until(lambda: _expired(client, command))
    plain = client.post("/api/command", json={"command": command, "background": True}).json()
    assert plain["status"] == "running"  # a miss: the run waits on the gate
    opener = threading.Timer(10, gate.touch)  # so that a wrong answer fails, not hangs
    opener.start()
    try:
        answer = client.post("/api/command", json={"command": command, "stale": 60}).json()
        assert (answer["cached"], answer.get("stale"), answer["stdout"]) == (
            True,
            True,
            first["stdout"],
        )
    finally:
        gate.touch()
        opener.cancel()
    until(lambda: _no_job_running(client))
    fresh = client.post("/api/command", json={"command": command}).json()
    assert fresh["cached"] is True and fresh["stdout"] != first["stdout"]
