"""``runcache serve``'s ``/mcp`` endpoint bounds what a client can make it hold:
sessions per client address, and the request body."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import psutil
import requests
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import LiveServer

_MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "flood", "version": "1"},
    },
}
_INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def _connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection: http.client sends a request's head and body in one
    write (requests sends two, and Nagle's algorithm then waits 40 ms for an ACK)."""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)


def _post(
    connection: http.client.HTTPConnection, message: dict[str, Any], session_id: str | None = None
) -> http.client.HTTPResponse:
    headers = {**_MCP_HEADERS, **({"mcp-session-id": session_id} if session_id else {})}
    connection.request("POST", "/mcp", json.dumps(message).encode(), headers)
    answer = connection.getresponse()
    answer.read()
    return answer


def _open_session(connection: http.client.HTTPConnection) -> str:
    answer = _post(connection, _INITIALIZE)
    assert answer.status == 200
    session_id = answer.getheader("mcp-session-id")
    assert session_id is not None
    return session_id


def _new_client_runs(url: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with create_mcp_http_client() as client:
            async with streamable_http_client(f"{url}/mcp", http_client=client) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    result = await session.call_tool(
                        "execute_command", {"command": "echo still served"}
                    )
                    assert isinstance(result.structured_content, dict)
                    return result.structured_content

    return anyio.run(main)


def test_many_sessions_from_one_client_close_its_oldest_and_others_still_connect(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory("--mcp-sessions-per-client", "50")
    rss = psutil.Process(server.process.pid)
    connection = _connect(server.url)
    first = _open_session(connection)  # loads the SDK: counted before the flood
    assert _post(connection, _INITIALIZED, first).status == 202
    before = rss.memory_info().rss
    for _ in range(600):  # about 20 s on a loaded 2-core machine
        _open_session(connection)
    grown = rss.memory_info().rss - before
    assert _post(connection, _INITIALIZED, first).status == 404  # closed, as the oldest
    connection.close()
    assert _new_client_runs(server.url)["stdout"] == "still served\n"
    # 600 sessions kept open would take about 21 MiB (36 KiB each); kept at 50 it grew 5.8.
    assert grown < 12 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"


def test_a_body_past_max_body_bytes_is_refused_at_mcp_as_at_the_api(
    live_server: LiveServer,
) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "' + b"x" * (3 << 20) + b'"}'
    api = requests.post(
        f"{live_server.url}/api/command", data=body, timeout=30, headers=_MCP_HEADERS
    )
    mcp = requests.post(f"{live_server.url}/mcp", data=body, timeout=30, headers=_MCP_HEADERS)
    assert api.status_code == mcp.status_code == 413
    assert (
        mcp.json()
        == api.json()
        == {"error": "request body is larger than the limit of 1048576 bytes"}
    )
    chunked = requests.post(
        f"{live_server.url}/mcp",
        data=iter([body[: 1 << 20], body[1 << 20 :]]),
        timeout=30,
        headers=_MCP_HEADERS,
    )
    assert chunked.status_code == 413 and chunked.json() == api.json()
    assert _new_client_runs(live_server.url)["stdout"] == "still served\n"
