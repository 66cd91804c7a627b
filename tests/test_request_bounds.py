"""Numbers and bodies past what the parsers take: a clear 400, never a 500.

``int()`` refuses a string of more than 4,300 digits with a ValueError, and
msgspec a JSON body nested deeper than Python's recursion limit with a
RecursionError, even in a field no request declares. Each reached the
unexpected-error handler (a 500 and a traceback in the log) from a query
parameter, the ``Last-Event-ID`` header or a body. Each case runs against the
app in process and against a real server, whose log must show no traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from starlette.testclient import TestClient

from conftest import LiveServer, until

#: Answers ``(status, JSON body)`` to ``(method, path, headers, body)``.
Send = Callable[[str, str, dict[str, str], bytes | None], tuple[int, Any]]

_DIGITS = "9" * 5000
_DEEP = b"[" * 2000 + b"]" * 2000


def _in_process(client: TestClient) -> Send:
    def send(
        method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, Any]:
        answer = client.request(method, path, headers=headers, content=body)
        return answer.status_code, answer.json()

    return send


def _live(server: LiveServer) -> Send:
    def send(
        method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, Any]:
        answer = requests.request(
            method, f"{server.url}{path}", headers=headers, data=body, timeout=30
        )
        return answer.status_code, answer.json()

    return send


def _refused_each(send: Send) -> None:
    status, started = send(
        "POST",
        "/api/command",
        {"Content-Type": "application/json"},
        b'{"command": "echo bounds", "background": true}',
    )
    assert status == 202
    job = started["job_id"]
    until(lambda: send("GET", f"/api/jobs/{job}", {}, None)[1]["status"] == "completed")
    numbers = [
        (f"/api/cache/entries?offset={_DIGITS}", {}, "offset must be a whole number from 0 to "),
        (f"/api/cache/entries?limit={_DIGITS}", {}, "limit must be a whole number from 1 to "),
        (f"/api/jobs/{job}/output?offset={_DIGITS}", {}, "offset must be a whole number"),
        (f"/api/jobs/{job}/output?limit={_DIGITS}", {}, "limit must be a whole number"),
        (
            f"/api/jobs/{job}/events",
            {"Last-Event-ID": f"{_DIGITS}:0"},
            "Last-Event-ID must be <stdout offset>:<stderr offset>",
        ),
        (
            f"/api/jobs/{job}/events",
            {"Last-Event-ID": f"0:{_DIGITS}"},
            "Last-Event-ID must be <stdout offset>:<stderr offset>",
        ),
    ]
    for path, headers, message in numbers:
        status, answer = send("GET", path, headers, None)
        assert status == 400 and answer["error"].startswith(message), (path, answer)
    jobs_before = send("GET", "/api/jobs", {}, None)[1]["jobs"]
    bodies = [
        ("/api/command", b'{"command": "echo deep", "unknown": ' + _DEEP + b"}"),
        ("/api/command", b'{"command": "echo deep", "unknown": {"a": ' + _DEEP + b"}}"),
        ("/api/process/execute-async", b'{"command": "echo deep", "x": ' + _DEEP + b"}"),
        ("/api/cache/invalidate", b'{"prefix": "echo", "x": ' + _DEEP + b"}"),
        ("/api/command", b'{"command": ' + _DEEP + b"}"),
    ]
    for path, body in bodies:
        status, answer = send("POST", path, {"Content-Type": "application/json"}, body)
        assert status == 400, (path, answer)
        assert answer == {
            "error": "request body is nested too deeply: its arrays and "
            "objects may nest a few hundred deep"
        }
    assert send("GET", "/api/jobs", {}, None)[1]["jobs"] == jobs_before  # nothing ran
    assert send("GET", "/api/cache/stats", {}, None)[1]["size"] == 1  # nothing invalidated


def test_huge_numbers_and_deep_bodies_answer_400_in_process(client: TestClient) -> None:
    _refused_each(_in_process(client))


def test_huge_numbers_and_deep_bodies_answer_400_from_a_server_without_a_traceback(
    live_server: LiveServer,
) -> None:
    _refused_each(_live(live_server))
    log = "".join(live_server.output)
    assert "Traceback" not in log and "unexpected error" not in log, log
