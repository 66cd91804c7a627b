"""``runcache mcp`` as a real subprocess, driven by the MCP SDK's own stdio client."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent

from runcache import wire

from conftest import LiveServer, free_port

#: Each tool and the wire shape it answers with.
ANSWERS: dict[str, type[msgspec.Struct]] = {
    "execute_command": wire.CommandResult,
    "get_cache_stats": wire.CacheStats,
    "clear_cache": wire.Cleared,
    "server_health": wire.Health,
    "get_telemetry": wire.Telemetry,
}
TOOLS = set(ANSWERS)

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
    """Call a tool that must succeed; its structured result, checked against the wire's
    schema of its answer (strictly: formats too), and the same JSON as its text."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, _text(result)
    structured: dict[str, Any] | None = result.structured_content
    assert structured is not None
    schema = wire.shape_schema(ANSWERS[tool])
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(structured)
    assert orjson.loads(_text(result)) == structured
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


@pytest.mark.parametrize("shape", [wire.CommandRequest, *ANSWERS.values()],
                         ids=lambda shape: shape.__name__)
def test_a_tool_schema_is_the_openapi_component_with_its_references_inside(
    shape: type[msgspec.Struct],
) -> None:
    components = wire.schema_components(ref_template="#/$defs/{name}")
    schema = wire.shape_schema(shape)
    inside = schema.pop("$defs", {})
    assert schema == components[shape.__name__]
    assert inside == {name: components[name] for name in inside}


def test_tools_list_the_wire_schemas(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert tools.keys() == TOOLS
        for name, tool in tools.items():
            assert tool.description, name
            assert tool.output_schema == wire.shape_schema(ANSWERS[name]), name
            Draft202012Validator.check_schema(tool.output_schema)
        execute = tools["execute_command"]
        assert execute.input_schema == wire.shape_schema(wire.CommandRequest)
        assert execute.input_schema["required"] == ["command"]  # timeout and ttl optional
        assert set(execute.input_schema["properties"]) == {"command", "use_cache", "timeout", "ttl"}
        for name in TOOLS - {"execute_command"}:
            assert tools[name].input_schema["properties"] == {}, name
        hints = {name: tool.annotations for name, tool in tools.items()}
        assert all(hints[name] and hints[name].read_only_hint
                   for name in ("get_cache_stats", "server_health", "get_telemetry"))
        assert hints["clear_cache"] and hints["clear_cache"].idempotent_hint
        assert hints["execute_command"] and hints["execute_command"].open_world_hint

    drive(mcp_args, tmp_path / "mcp.log", scenario)


def test_tools_cache_stats_and_clear(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
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
        no_ttl = await session.call_tool("execute_command", {"command": "true", "ttl": 0})
        assert no_ttl.is_error and "ttl must be greater than 0 seconds" in _text(no_ttl)
        kept = await call(session, "execute_command", command="echo ok", ttl=60)
        assert kept["stdout"] == "ok\n"

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
