"""HTTP answers: a stored result goes out in slices with its flags, errors with their headers."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message

from runcache.errors import Busy, MethodNotAllowed, RuncacheError, Unauthorized
from runcache.web import responses
from runcache.web.responses import ResultResponse, error_answer

STORED = b'{"stdout":"' + b"0123456789" * 3 + b'","return_code":0}'
TAIL = b',"cached":true,"coalesced":false}'


def sent(response: ResultResponse) -> list[Message]:
    """The ASGI messages ``response`` sends."""
    messages: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("a response reads nothing")

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/command", "headers": []}
    asyncio.run(response(scope, receive, send))
    return messages


@pytest.mark.parametrize("chunk", [7, 8, len(STORED) - 1, 1 << 18])
def test_a_result_goes_out_in_slices_then_its_tail(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(responses, "CHUNK_BYTES", chunk)
    start, *bodies = sent(ResultResponse(STORED, TAIL))
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(STORED) - 1 + len(TAIL)

    *pieces, last = bodies
    head = STORED[:-1]  # the stored object without its closing brace
    assert [piece["body"] for piece in pieces] == [
        head[start : start + chunk] for start in range(0, len(head), chunk)
    ]
    assert all(piece["type"] == "http.response.body" and piece["more_body"] for piece in pieces)
    assert last == {"type": "http.response.body", "body": TAIL, "more_body": False}
    joined = b"".join(message["body"] for message in bodies)
    assert json.loads(joined) == {**json.loads(STORED), "cached": True, "coalesced": False}


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (Busy("all slots busy", retry_after=5), 503, {"retry-after": "5"}),
        (Unauthorized("send a token"), 401, {"www-authenticate": 'Bearer realm="runcache"'}),
        (MethodNotAllowed("no", ("POST", "OPTIONS")), 405, {"allow": "POST, OPTIONS"}),
    ],
)
def test_an_error_answer_carries_its_status_and_headers(
    error: RuncacheError, status: int, headers: dict[str, str]
) -> None:
    answer = error_answer(error)
    assert answer.status_code == status
    assert json.loads(bytes(answer.body)) == {"error": error.message}
    assert answer.headers["content-type"] == "application/json"
    assert {name: answer.headers[name] for name in headers} == headers
