"""``runcache mcp`` as a real subprocess, driven by the MCP SDK's own stdio client."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent

from conftest import LiveServer, free_port

TOOLS = {"execute_command", "get_cache_stats", "clear_cache", "server_health", "get_telemetry"}

Scenario = Callable[[ClientSession], Awaitable[None]]


@asynccontextmanager
async def mcp_session(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[ClientSession]:
    """Start ``runcache mcp`` with ``args`` (and ``env`` added) and a session to it."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "runcache", "mcp", *args],
        cwd=str(log.parent),
        env={**os.environ, **env} if env else None,
    )
    with log.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def drive(
    args: list[str], log: Path, scenario: Scenario, env: dict[str, str] | None = None
) -> None:
    """Run one scenario against a fresh ``runcache mcp`` process."""

    async def main() -> None:
        async with mcp_session(args, log, env) as session:
            await scenario(session)

    anyio.run(main)


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, _text(result)
    structured: dict[str, Any] | None = result.structured_content
    assert structured is not None
    return structured


def _text(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


@pytest.fixture(params=["server", "in-process"])
def mcp_args(request: pytest.FixtureRequest) -> list[str]:
    """The adapter forwarding to a real server, and the adapter with its own engine."""
    if request.param == "server":
        server: LiveServer = request.getfixturevalue("live_server")
        return ["--server", server.url]
    return []


def test_tools_cache_stats_and_clear(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        listed = await session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        assert all(tool.description for tool in listed.tools)
        first = await call(session, "execute_command", command="echo $$")
        second = await call(session, "execute_command", command="echo $$")
        assert (first["cached"], second["cached"]) == (False, True)
        assert second["stdout"] == first["stdout"] and first["return_code"] == 0
        stats = await call(session, "get_cache_stats")
        assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 1, "50.0%")
        fresh = await call(session, "execute_command", command="echo $$", use_cache=False)
        assert fresh["cached"] is False and fresh["stdout"] != first["stdout"]
        assert await call(session, "clear_cache") == {"success": True, "message": "Cache cleared"}
        stats = await call(session, "get_cache_stats")
        assert (stats["size"], stats["hits"], stats["misses"]) == (0, 0, 0)

    drive(mcp_args, tmp_path / "mcp.log", scenario)


def test_health_telemetry_and_a_failing_command(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        failed = await call(session, "execute_command", command="echo oops >&2; exit 4")
        assert (failed["return_code"], failed["stderr"], failed["success"]) == (4, "oops\n", False)
        timed_out = await call(session, "execute_command", command="sleep 30", timeout=0.3)
        assert timed_out["timed_out"] is True
        health = await call(session, "server_health")
        assert health["status"] == "healthy" and health["cache_stats"]["size"] == 0
        telemetry = await call(session, "get_telemetry")
        assert telemetry["commands_executed"] == 2 and telemetry["success_rate"] == "0.0%"

    drive(mcp_args, tmp_path / "mcp.log", scenario)


def test_errors_are_tool_errors_with_the_message_and_the_server_keeps_serving(
    mcp_args: list[str], tmp_path: Path
) -> None:
    async def scenario(session: ClientSession) -> None:
        empty = await session.call_tool("execute_command", {"command": ""})
        assert empty.is_error and "Command parameter is required" in _text(empty)
        too_long = await session.call_tool("execute_command", {"command": "true", "timeout": 1e9})
        assert too_long.is_error and "timeout must be at most 3600 seconds" in _text(too_long)
        assert (await call(session, "execute_command", command="echo ok"))["stdout"] == "ok\n"

    drive(mcp_args, tmp_path / "mcp.log", scenario)


def test_a_server_that_is_down_is_a_tool_error_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario(session: ClientSession) -> None:
        for tool, arguments in [("execute_command", {"command": "true"}), ("get_cache_stats", {})]:
            result = await session.call_tool(tool, arguments)
            assert result.is_error and f"cannot reach a runcache server at {url}" in _text(result)

    drive(["--server", url], tmp_path / "mcp.log", scenario)


def test_the_token_is_sent(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    token = "k" * 32
    server = live_server_factory(env={"RUNCACHE_TOKEN": token})

    async def scenario(session: ClientSession) -> None:
        assert (await call(session, "execute_command", command="echo hi"))["stdout"] == "hi\n"
        assert (await call(session, "clear_cache"))["success"] is True

    drive(["--server", server.url], tmp_path / "mcp.log", scenario, {"RUNCACHE_TOKEN": token})


def test_logs_go_to_stderr_and_hanging_up_kills_a_running_command(tmp_path: Path) -> None:
    log = tmp_path / "mcp.log"

    async def scenario(session: ClientSession) -> None:
        await call(session, "execute_command", command="echo hi")
        with anyio.move_on_after(0.5):
            await session.call_tool("execute_command", {"command": "sleep 60"})

    drive([], log, scenario)
    logged = log.read_text()
    assert "runcache MCP server on stdio" in logged and "ran 'echo hi'" in logged
    # Killed by the adapter closing its engine, not left for the client's kill of the tree.
    assert "ran 'sleep 60': exit -9" in logged
