"""The HTTP API through Starlette's test client: the contract's fields and every bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.web.app import create_app

from conftest import FakeClock

RESULT_FIELDS = {
    "stdout": str,
    "stderr": str,
    "return_code": int,
    "success": bool,
    "timed_out": bool,
    "partial_results": bool,
    "execution_time": float,
    "timestamp": str,
    "cached": bool,
    "cache_key": str,
    "coalesced": bool,
    "stdout_truncated": bool,
    "stderr_truncated": bool,
}


def run(client: TestClient, **body: object) -> dict[str, object]:
    response = client.post("/api/command", json=body)
    assert response.status_code == 200, response.json()
    payload: dict[str, object] = response.json()
    return payload


def stats(client: TestClient) -> dict[str, object]:
    payload: dict[str, object] = client.get("/api/cache/stats").json()
    return payload


def test_command_result_has_every_contract_field(client: TestClient) -> None:
    result = run(client, command="echo hello")
    for name, kind in RESULT_FIELDS.items():
        assert isinstance(result[name], kind), name
    assert result["stdout"] == "hello\n" and result["success"] is True
    assert result["cached"] is False


def test_second_identical_command_is_a_cache_hit(client: TestClient) -> None:
    first = run(client, command="cat /proc/sys/kernel/random/uuid")  # differs on every real run
    second = run(client, command="cat /proc/sys/kernel/random/uuid")
    assert second["cached"] is True and first["cached"] is False
    assert second["stdout"] == first["stdout"]
    assert second["cache_key"] == first["cache_key"]
    counts = stats(client)
    assert (counts["hits"], counts["misses"], counts["size"]) == (1, 1, 1)


def test_use_cache_false_runs_again_and_does_not_look_up(client: TestClient) -> None:
    first = run(client, command="cat /proc/sys/kernel/random/uuid")
    second = run(client, command="cat /proc/sys/kernel/random/uuid", use_cache=False)
    assert second["cached"] is False and second["stdout"] != first["stdout"]
    assert stats(client)["misses"] == 1


def test_refresh_runs_again_and_replaces_the_stored_result(
    client: TestClient, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    first = client.post("/api/command", json={"command": command}).json()
    hit = client.post("/api/command", json={"command": command}).json()
    assert (first["stdout"], hit["stdout"], hit["cached"]) == ("1\n", "1\n", True)
    refreshed = client.post("/api/command", json={"command": command, "refresh": True}).json()
    assert (refreshed["stdout"], refreshed["cached"]) == ("2\n", False)
    after = client.post("/api/command", json={"command": command}).json()
    assert (after["stdout"], after["cached"]) == ("2\n", True)  # the new result, stored
    stats = client.get("/api/cache/stats").json()
    assert (stats["size"], stats["hits"], stats["misses"]) == (1, 2, 1)  # a refresh is neither


def test_refresh_with_use_cache_false_is_a_400_and_runs_nothing(
    client: TestClient, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    response = client.post(
        "/api/command", json={"command": f"echo run >> {runs}", "refresh": True, "use_cache": False}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("refresh stores the new result and use_cache")
    assert not runs.exists()


def test_failed_commands_are_not_cached(client: TestClient) -> None:
    run(client, command="echo $$; exit 1")
    again = run(client, command="echo $$; exit 1")
    assert again["cached"] is False and again["return_code"] == 1
    assert stats(client)["size"] == 0


def test_timed_out_command_reports_partial_results(client: TestClient) -> None:
    result = run(client, command="echo partial; sleep 30", timeout=0.5)
    assert result["timed_out"] is True and result["partial_results"] is True
    assert result["success"] is False and result["stdout"] == "partial\n"
    assert stats(client)["size"] == 0


def test_request_ttl_applies_to_its_entry(client: TestClient, fake_clock: FakeClock) -> None:
    run(client, command="echo short", ttl=5)
    run(client, command="echo default")
    fake_clock.tick(6)
    assert run(client, command="echo short")["cached"] is False
    assert run(client, command="echo default")["cached"] is True
    assert stats(client)["expirations"] == 1


def test_stats_fields(client: TestClient) -> None:
    counts = stats(client)
    for name in (
        "size",
        "max_size",
        "hits",
        "misses",
        "evictions",
        "expirations",
        "coalesced",
        "bytes",
        "max_bytes",
    ):
        assert isinstance(counts[name], int), name
    assert counts["hit_rate"] == "0.0%" and counts["max_size"] == 1000


def test_clear_is_exactly_as_specified(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    run(client, command="echo a")
    run(client, command="echo a")
    run(client, command="echo b")
    with caplog.at_level(logging.INFO):
        response = client.post("/api/cache/clear")
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Cache cleared"}
    assert response.headers["content-type"] == "application/json"
    # runcache's own INFO lines (the test client logs each request it sends too)
    server_lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.name.startswith("runcache")
    ]
    assert server_lines == ["🧹 Cache cleared"]
    counts = stats(client)
    assert (counts["hits"], counts["misses"], counts["evictions"], counts["size"]) == (0, 0, 0, 0)
    assert run(client, command="echo a")["cached"] is False


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (None, None),
        (b"", "text/plain"),
        (b"not json", "application/json"),
        (b"[1]", None),
        (b'{"anything": "else"}', "application/x-www-form-urlencoded"),
    ],
)
def test_clear_takes_any_body_or_none(
    client: TestClient, data: bytes | None, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/cache/clear", content=data, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Cache cleared"}


def test_health_and_telemetry(client: TestClient) -> None:
    run(client, command="echo x")
    run(client, command="exit 2")
    health = client.get("/health").json()
    assert health["status"] == "healthy" and isinstance(health["version"], str)
    assert isinstance(health["uptime"], float)
    assert health["cache_stats"].keys() >= {"size", "hits", "hit_rate"}
    telemetry = client.get("/api/telemetry").json()
    assert health["telemetry"].keys() == telemetry.keys()
    assert telemetry["commands_executed"] == 2
    assert telemetry["success_rate"] == "50.0%"
    assert telemetry["average_execution_time"].endswith("s")
    assert isinstance(telemetry["uptime_seconds"], float)
    assert telemetry["system_metrics"].keys() >= {"cpu_percent", "memory_percent", "disk_usage"}


def test_health_and_the_dashboards_never_sample_the_cpu_on_the_request(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU sample with an interval blocks for that long: the load figures read the
    change since the previous call instead (interval None)."""
    intervals: list[object] = []
    real = psutil.cpu_percent

    def recording(interval: float | None = None, percpu: bool = False) -> object:
        intervals.append(interval)
        return real(None, True) if percpu else real(None)

    monkeypatch.setattr(psutil, "cpu_percent", recording)
    for path in ("/health", "/api/telemetry", "/api/processes/dashboard"):
        assert client.get(path).status_code == 200
    assert intervals and all(interval in (None, 0) for interval in intervals)


def test_livez(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}


BAD_COMMAND_BODIES = [
    (b"", "Command parameter is required"),
    (b"{}", "Command parameter is required"),
    (b'{"command": ""}', "Command parameter is required"),
    (b'{"command": "   "}', "Command parameter is required"),
    (b'{"command": null}', "Command parameter is required"),
    (b"not json", "valid JSON"),
    (b'{"command": "echo"', "valid JSON"),
    (b'["echo hi"]', "JSON object"),
    (b'"echo hi"', "JSON object"),
    (b'{"command": 123}', "command must be a string"),
    (b'{"command": ["echo"]}', "command must be a string"),
    (b'{"command": "echo \\u0000"}', "NUL"),
    (b'{"command": "echo", "use_cache": "no"}', "use_cache"),
    (b'{"command": "echo", "use_cache": 1}', "use_cache"),
    (b'{"command": "echo", "timeout": -1}', "timeout"),
    (b'{"command": "echo", "timeout": 0}', "timeout"),
    (b'{"command": "echo", "timeout": 1e300}', "timeout must be at most"),
    (b'{"command": "echo", "timeout": "5"}', "timeout"),
    (b'{"command": "echo", "timeout": true}', "timeout"),
    (b'{"command": "echo", "ttl": -5}', "ttl"),
    (b'{"command": "echo", "ttl": 0}', "ttl"),
    (b'{"command": "echo", "ttl": 1e12}', "ttl must be at most"),
    (b'{"command": "echo", "ttl": {}}', "ttl"),
    (b'{"command": "echo", "cache_exit_codes": [256]}', "whole numbers from 0 to 255"),
    (b'{"command": "echo", "cache_exit_codes": []}', "1 to 256 whole numbers"),
    (b'{"command": "echo", "cache_exit_codes": "0"}', "cache_exit_codes must be a list"),
    (b'{"command": "echo", "cache_exit_codes": [true]}', "cache_exit_codes must be a list"),
    (b'{"command": "echo", "inputs": "src/*.py"}', "inputs must be a list"),
    (b'{"command": "echo", "inputs": [""]}', "each 1 to 4096 characters"),
    # Strict about what it is told: a misspelt field does not run with the default.
    (b'{"command": "sleep 1", "timeot": 0.1}', "unknown field 'timeot'; did you mean 'timeout'?"),
    (b'{"command": "echo", "usecache": false}', "did you mean 'use_cache'?"),
]


@pytest.mark.parametrize(("body", "message"), BAD_COMMAND_BODIES)
def test_bad_command_requests_get_400_and_change_nothing(
    client: TestClient, body: bytes, message: str
) -> None:
    before = stats(client)
    response = client.post(
        "/api/command", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert stats(client) == before
    assert client.get("/api/telemetry").json()["commands_executed"] == 0


def test_missing_command_error_is_the_contract_body(client: TestClient) -> None:
    response = client.post("/api/command", json={})
    assert response.json() == {"error": "Command parameter is required"}


def test_body_over_the_limit_is_413() -> None:
    small = Config.load({"max_body_bytes": 100}, environ={})
    engine = Engine.from_config(small)
    try:
        with TestClient(create_app(engine=engine)) as client:
            response = client.post("/api/command", json={"command": "echo " + "x" * 200})
        assert response.status_code == 413
        assert "100 bytes" in response.json()["error"]
        assert response.headers["connection"] == "close"  # the unread rest is not drained
        assert engine.telemetry.snapshot().commands_executed == 0
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/command", 405),
        ("PUT", "/api/cache/clear", 405),
        ("DELETE", "/api/cache/stats", 405),
        ("POST", "/health", 405),
        ("GET", "/nowhere", 404),
        ("POST", "/api/commands", 404),
    ],
)
def test_wrong_method_and_unknown_path_are_json(
    client: TestClient, method: str, path: str, status: int
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert path in response.json()["error"]


def test_large_results_stream_the_same_json(client: TestClient) -> None:
    command = "head -c 600000 /dev/zero | tr '\\0' a; printf '\\377\"'"
    first = client.post("/api/command", json={"command": command})
    second = client.post("/api/command", json={"command": command})
    for response, cached in ((first, False), (second, True)):
        payload = response.json()
        assert payload["stdout"] == "a" * 600000 + '\ufffd"'
        assert payload["cached"] is cached
        assert int(response.headers["content-length"]) == len(response.content)
