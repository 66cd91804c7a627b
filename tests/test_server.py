"""End to end: ``runcache serve`` as a real process on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from conftest import LiveServer


def post(server: LiveServer, path: str, **body: object) -> requests.Response:
    return requests.post(server.url + path, json=body or None, timeout=30)


def test_run_twice_hit_clear_and_stats_zero(live_server: LiveServer) -> None:
    first = post(live_server, "/api/command", command="echo $$").json()
    second = post(live_server, "/api/command", command="echo $$").json()
    assert first["cached"] is False and second["cached"] is True
    assert second["stdout"] == first["stdout"]
    cleared = requests.post(live_server.url + "/api/cache/clear", timeout=10)
    assert cleared.status_code == 200
    assert cleared.json() == {"success": True, "message": "Cache cleared"}
    stats = requests.get(live_server.url + "/api/cache/stats", timeout=10).json()
    assert (stats["size"], stats["hits"], stats["misses"], stats["evictions"]) == (0, 0, 0, 0)
    assert stats["hit_rate"] == "0.0%"
    assert any("🧹 Cache cleared" in line for line in live_server.output)


def test_twenty_concurrent_identical_requests_run_once(
    live_server: LiveServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; sleep 0.5; echo done"
    answers: list[dict[str, object]] = []

    def ask() -> None:
        answers.append(post(live_server, "/api/command", command=command).json())

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs.read_text() == "run\n"
    assert len(answers) == 20 and {a["stdout"] for a in answers} == {"done\n"}


def test_bad_input_over_http_is_json_4xx(live_server: LiveServer) -> None:
    response = requests.post(live_server.url + "/api/command", data=b"{nope", timeout=10)
    assert response.status_code == 400 and "valid JSON" in response.json()["error"]
    response = requests.post(live_server.url + "/api/command", data=b"x" * (2 << 20), timeout=10)
    assert response.status_code == 413 and "error" in response.json()
    response = requests.get(live_server.url + "/missing", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_sigterm_stops_cleanly_and_kills_running_commands(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server_factory()
    pid_file = tmp_path / "pid"
    command = f"sleep 120 & echo $! > {pid_file}; wait"
    thread = threading.Thread(
        target=lambda: _ignore_errors(post, server, "/api/command", command=command)
    )
    thread.start()
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.02)
    sleeper = psutil.Process(int(pid_file.read_text()))
    assert server.stop() == 0
    sleeper.wait(10)  # raises if the command outlived the server
    thread.join(10)
    assert any("stopping" in line for line in server.output)


def test_a_hit_costs_no_info_log_line(live_server: LiveServer) -> None:
    post(live_server, "/api/command", command="echo quiet")
    time.sleep(0.2)
    lines_before = len(live_server.output)
    for _ in range(5):
        assert post(live_server, "/api/command", command="echo quiet").json()["cached"]
    time.sleep(0.2)
    assert live_server.output[lines_before:] == []


def test_start_up_errors_are_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--store", "ftp://nowhere"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "runcache: unknown store 'ftp://nowhere': use one of " + result.stderr.split("one of ")[1]
        .strip()
    ]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(live_server: LiveServer) -> None:
    port = live_server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", port],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and port in result.stderr


def _ignore_errors(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)
    except requests.RequestException:
        pass


def test_serves_on_ipv6_loopback(live_server_factory: Callable[..., LiveServer]) -> None:
    server = live_server_factory("--host", "::1")
    assert server.url.startswith("http://[::1]:")
    assert requests.get(server.url + "/livez", timeout=10).json() == {"status": "ok"}
