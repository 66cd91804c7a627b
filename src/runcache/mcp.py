"""The MCP adapter: runcache's operations as tools over stdio, for AI agents.

The tools keep the names agent setups for this API already call. Each is a thin
call on a :class:`~runcache.client.Backend`, so the adapter behaves the same
whether it forwards to a server or runs the engine in this process. A runcache
error comes back as an MCP tool error carrying its message; the process keeps
serving. Stdout is the protocol, so every log line goes to stderr.

This module is ``runcache.mcp``; the absolute ``import mcp...`` lines below
resolve to the MCP SDK, never to this module.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from msgspec import Struct

from runcache import __version__, wire
from runcache.client import Backend
from runcache.errors import RuncacheError

log = logging.getLogger(__name__)

T = TypeVar("T")

INSTRUCTIONS = (
    "runcache runs shell commands and caches successful results, so asking for the same "
    "command again answers at once from the cache. Use execute_command to run a command "
    "(use_cache=false forces a fresh run); the other tools report on the cache and the "
    "service or empty the cache."
)

_RUNS = ToolAnnotations(destructive_hint=True, open_world_hint=True)
_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
_CLEARS = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)

_EXECUTE = (
    "Run a shell command (with /bin/sh -c) and return its result: stdout, stderr, "
    "return_code, success (exit code 0 and not timed out), timed_out, "
    "partial_results, execution_time (seconds), timestamp, and cached (true when "
    "the answer came from the cache). Successful results are cached; set "
    "use_cache=false to run the command again regardless. timeout is the most "
    "seconds the command may run, and ttl how many seconds its result is kept "
    "(each the server's default when omitted)."
)
_STATS = (
    "Return the cache statistics: size (entries held), max_size, hits, misses, evictions "
    'and hit_rate (a percentage string such as "87.5%").'
)
_CLEAR = (
    "Empty the cache and reset its statistics to zero. Returns "
    '{"success": true, "message": "Cache cleared"}.'
)
_HEALTH = (
    'Return the service\'s health: status ("healthy" when all is well), version, '
    "cache_stats, telemetry and uptime (seconds)."
)
_TELEMETRY = (
    "Return execution telemetry: uptime_seconds, commands_executed, success_rate, "
    "average_execution_time and system_metrics (cpu_percent, memory_percent, disk_usage)."
)


def build_server(backend: Backend) -> MCPServer:
    """An MCP server whose tools call ``backend``."""

    async def execute_command(
        command: str, use_cache: bool = True, timeout: float | None = None,
        ttl: float | None = None,
    ) -> CallToolResult:
        return _answer(await _call(backend.execute, command, use_cache, timeout, ttl))

    tools = [_tool(execute_command, _EXECUTE, _RUNS, wire.CommandResult, wire.CommandRequest)]
    without_arguments: list[tuple[str, str, ToolAnnotations, type[Struct], Callable[[], Struct]]]
    without_arguments = [
        ("get_cache_stats", _STATS, _READ_ONLY, wire.CacheStats, backend.cache_stats),
        ("clear_cache", _CLEAR, _CLEARS, wire.Cleared, backend.clear),
        ("server_health", _HEALTH, _READ_ONLY, wire.Health, backend.health),
        ("get_telemetry", _TELEMETRY, _READ_ONLY, wire.Telemetry, backend.telemetry),
    ]
    for name, description, hints, shape, operation in without_arguments:
        tools.append(_tool(_without_arguments(name, operation), description, hints, shape))
    return MCPServer(
        "runcache", title="runcache", instructions=INSTRUCTIONS, version=__version__, tools=tools
    )


def _tool(
    fn: Callable[..., Awaitable[CallToolResult]],
    description: str,
    annotations: ToolAnnotations,
    answer: type[Struct],
    request: type[Struct] | None = None,
) -> Tool:
    """A tool whose schemas are :mod:`runcache.wire`'s: ``answer``'s for its output and,
    when it takes arguments, ``request``'s for its input.

    The SDK would derive both from the function's annotations; they are replaced
    by the shapes the HTTP API declares, so the two cannot drift apart. The SDK
    still reads the arguments by the function's signature (which must name the
    request's fields), leniently as it always has; the backend then checks them
    as the server does, with its messages.
    """
    tool = Tool.from_function(fn, description=description, annotations=annotations)
    if request is not None:
        tool.parameters = wire.shape_schema(request)
        declared = set(tool.parameters["properties"])
        taken = set(tool.fn_metadata.arg_model.model_fields)
        if taken != declared:
            raise TypeError(f"{tool.name} takes {sorted(taken)}; "
                            f"{request.__name__} declares {sorted(declared)}")
    # Read live by the SDK: the tool lists this schema, and answers with a CallToolResult
    # whose structured content the client checks against it.
    tool.fn_metadata.output_schema = wire.shape_schema(answer)
    return tool


def _answer(value: Struct) -> CallToolResult:
    """A tool's result: the shape as structured content, and as JSON text for clients
    that read only text."""
    text = TextContent(type="text", text=wire.encode(value).decode())
    return CallToolResult(content=[text], structured_content=wire.to_builtins(value))


def _without_arguments(
    name: str, operation: Callable[[], Struct]
) -> Callable[[], Awaitable[CallToolResult]]:
    """A tool that takes no arguments and answers with what ``operation`` returns."""

    async def tool() -> CallToolResult:
        return _answer(await _call(operation))

    tool.__name__ = tool.__qualname__ = name  # the tool's name, and its input schema's title
    return tool


async def _call(operation: Callable[..., T], *args: Any) -> T:
    """Run a blocking backend call in a worker thread; a runcache error becomes a tool error.

    The thread is abandoned if the MCP session ends while it waits, so shutting
    down never waits on a long command: closing the backend kills it instead.
    """
    try:
        return await anyio.to_thread.run_sync(
            functools.partial(operation, *args), abandon_on_cancel=True
        )
    except RuncacheError as error:
        raise ToolError(error.message) from None


def serve_stdio(backend: Backend, log_level: str = "INFO") -> None:
    """Serve MCP on stdin/stdout until the client hangs up, then close the backend.

    SIGTERM (what an MCP client sends when stdin's closing was not enough) ends
    the server the same way, so commands running in this process die with it.
    """
    # Configured before the SDK's own set-up, which then leaves it alone.
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    server = build_server(backend)
    log.info("runcache MCP server on stdio, using %s", backend.description)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run("stdio")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        backend.close()
        sys.stderr.flush()
