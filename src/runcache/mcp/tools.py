"""The MCP adapter: runcache's operations as tools for AI agents, over stdio or HTTP.

The tools keep the names agent setups for this API already call, and add the
reference client's process tools and runcache's jobs. Each is a thin call on a
:class:`~runcache.mcp.backends.ToolBackend`, so the tools behave the same
whether they run in ``runcache serve`` (Streamable HTTP at ``/mcp``), forward
to a server, or run an engine in ``runcache mcp``'s own process. A runcache
error comes back as an MCP tool error carrying its message; the server keeps
serving. On stdio, stdout is the protocol, so every log line goes to stderr.

A command may run for minutes, and MCP clients give up on a call that sends
nothing for about a minute: ``execute_command`` runs the command as a job,
reports progress every ``PROGRESS_SECONDS`` while it runs, and returns at most
``max_output_chars`` of each stream (the head and the tail, with a line between
them saying how to read the rest with ``read_output``). A call the client
cancels gives the job up: it is killed unless someone else still wants it.

Over ``/mcp`` with tokens set, the job and process tools see and steer only the
jobs of the caller's token, as the HTTP routes do (:mod:`runcache.web.auth`); the
admin token sees all of them.

This module is ``runcache.mcp.tools``; the absolute ``import mcp...`` lines below
resolve to the MCP SDK, never to this module.
"""

from __future__ import annotations

import functools
import logging
import operator
import signal
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Optional, TypeVar

import anyio
import msgspec
import orjson
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from msgspec import Struct
from pydantic import ConfigDict, create_model
from starlette.routing import Route
from starlette.types import ASGIApp

from runcache import __version__, logs, wire
from runcache.engine.callers import CREDENTIAL, Caller, caller_of, viewer_of
from runcache.engine.job_answers import STREAMS
from runcache.errors import RuncacheError
from runcache.mcp.backends import ToolBackend
from runcache.mcp.shapes import (
    DEFAULT_OUTPUT_CHARS,
    DEFAULT_READ_BYTES,
    ExecuteRequest,
    ExecuteResult,
    JobRef,
    OutputRequest,
    ProcessRef,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between progress notifications while a command runs (clients wait ~60 s).
PROGRESS_SECONDS = 2.0

INSTRUCTIONS = (
    "runcache runs shell commands and caches successful results, so asking for the same "
    "command again answers at once from the cache. Use execute_command to run a command and "
    "wait for its result (use_cache=false forces a fresh run); long output comes back cut, "
    "with read_output to page the rest. start_command runs one in the background: follow it "
    "with job_status and read_output, stop it with cancel_job. The process tools list, watch, "
    "terminate, pause and resume running commands by pid; the others report on the cache and "
    "the service or empty the cache."
)

_RUNS = ToolAnnotations(destructive_hint=True, open_world_hint=True)
_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
_CLEARS = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)

_STEERS = ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False)

_EXECUTE = (
    "Run a shell command (with /bin/sh -c) and return its result: stdout, stderr, "
    "return_code, success (exit code 0 and not timed out), timed_out, cancelled, "
    "partial_results, execution_time (seconds), timestamp, cached (true when "
    "the answer came from the cache) and job_id. Successful results are cached; set "
    "use_cache=false to run the command again regardless and store nothing, or "
    "refresh=true to run it again and store the new result. timeout is the most "
    "seconds the command may run, and ttl how many seconds its result is kept "
    "(each the server's default when omitted). cwd (an absolute directory), env (variables "
    "to set) and stdin (text to feed it) give the run its context; each is part of the "
    "cache key. stale (seconds) accepts a cached result that long past its expiry while "
    "one run refreshes it. Progress is reported while it runs. "
    f"Each stream longer than max_output_chars (default {DEFAULT_OUTPUT_CHARS}) comes "
    "back as its head and tail with a line between saying how to read the rest "
    "(read_output with the job_id)."
)
_START = (
    "Start a shell command in the background and return at once: job_id, status, "
    "cache_key and pid (null when answered from the cache, then status is completed). "
    "An identical cacheable command already running is joined instead of run twice. "
    "Follow it with job_status and read_output; stop it with cancel_job."
)
_JOB_STATUS = (
    "Return a job: status (running, paused, completed, failed, timed_out or cancelled), "
    "pid, runtime, stdout_bytes, stderr_bytes, last_output, and once it has ended "
    "return_code and result (what execute_command returns, output whole)."
)
_READ_OUTPUT = (
    "Read a page of a job's stdout or stderr, while it runs or after: data from byte "
    f"offset (default 0), at most limit bytes (default {DEFAULT_READ_BYTES}), with "
    "next_offset to continue from, total_bytes so far, and eof once nothing more will come."
)
_CANCEL = (
    "Cancel a running job: kill its whole process group. Its result is not cached and "
    "says cancelled: true to everyone waiting on it."
)
_PROCESSES = (
    "List the running commands: active_processes keyed by pid (each with command, "
    "status, start_time, last_output, bytes_processed, runtime_formatted) and total_count."
)
_PROCESS_STATUS = "Return one run by the pid of its process-group leader."
_TERMINATE = "Kill a run's whole process group by its pid (as cancel_job does)."
_PAUSE = "Pause a run by its pid: SIGSTOP to its whole group; paused time is off its timeout."
_RESUME = "Resume a paused run by its pid: SIGCONT to its whole group."
_DASHBOARD = (
    "Return a dashboard of the running commands (pid, command, status, runtime, "
    "bytes_processed, last_output) and the machine's load."
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


class _Tools:
    """The tools, each a coroutine over one backend."""

    def __init__(self, backend: ToolBackend) -> None:
        self.backend = backend

    async def execute_command(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        request = _checked(ExecuteRequest, arguments)
        accepted = await _call(self.backend.start(request, _caller(ctx)))
        detail = await self._until_ended(accepted.job_id, request.timeout, ctx)
        if isinstance(detail.result, msgspec.UnsetType):
            raise ToolError(detail.error or f"job {detail.job_id} ended without a result")
        return _answer(cut_output(detail.result, accepted.job_id, request.max_output_chars))

    async def _until_ended(
        self, job_id: str, timeout: float | None, ctx: Context | None
    ) -> wire.JobDetail:
        """Wait for the job, reporting progress; a cancelled call gives the job up."""
        viewer = _viewer(ctx)
        try:
            while True:
                detail = await _call(self.backend.wait(job_id, PROGRESS_SECONDS, viewer))
                if detail.status not in ("running", "paused"):
                    return detail
                if ctx is not None:
                    await ctx.report_progress(detail.runtime, timeout, _progress_message(detail))
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self.backend.leave(job_id, viewer)
                except RuncacheError as error:
                    log.warning("could not give up job %s: %s", job_id, error.message)
            raise

    async def start_command(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        request = _checked(wire.RunRequest, arguments)
        return _answer(await _call(self.backend.start(request, _caller(ctx))))

    async def job_status(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        job = _checked(JobRef, arguments)
        return _answer(await _call(self.backend.wait(job.job_id, 0, _viewer(ctx))))

    async def read_output(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        page = _checked(OutputRequest, arguments)
        return _answer(
            await _call(
                self.backend.output(page.job_id, page.stream, page.offset, page.limit, _viewer(ctx))
            )
        )

    async def cancel_job(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        job = _checked(JobRef, arguments)
        return _answer(await _call(self.backend.cancel(job.job_id, _viewer(ctx))))

    async def get_cache_stats(self) -> CallToolResult:
        return _answer(await _call(self.backend.cache_stats()))

    async def clear_cache(self, ctx: Context | None = None) -> CallToolResult:
        _require_admin(ctx)
        return _answer(await _call(self.backend.clear(_caller(ctx))))

    async def server_health(self) -> CallToolResult:
        return _answer(await _call(self.backend.health()))

    async def get_telemetry(self) -> CallToolResult:
        return _answer(await _call(self.backend.telemetry()))

    async def list_active_processes(self, ctx: Context | None = None) -> CallToolResult:
        return _answer(await _call(self.backend.processes(_viewer(ctx))))

    async def get_process_status(
        self, ctx: Context | None = None, **arguments: Any
    ) -> CallToolResult:
        process = _checked(ProcessRef, arguments)
        return _answer(await _call(self.backend.process_status(process.pid, _viewer(ctx))))

    async def terminate_process(
        self, ctx: Context | None = None, **arguments: Any
    ) -> CallToolResult:
        return await self._steer(arguments, "terminate", ctx)

    async def pause_process(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        return await self._steer(arguments, "pause", ctx)

    async def resume_process(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        return await self._steer(arguments, "resume", ctx)

    async def _steer(
        self, arguments: dict[str, Any], verb: str, ctx: Context | None
    ) -> CallToolResult:
        process = _checked(ProcessRef, arguments)
        return _answer(await _call(self.backend.steer_process(process.pid, verb, _viewer(ctx))))

    async def get_process_dashboard(self, ctx: Context | None = None) -> CallToolResult:
        return _answer(await _call(self.backend.dashboard(_viewer(ctx))))


#: Each tool: its description, hints, answer shape and (when it takes arguments) request shape.
_TOOLS: list[tuple[str, str, ToolAnnotations, type[Struct], type[Struct] | None]] = [
    ("execute_command", _EXECUTE, _RUNS, ExecuteResult, ExecuteRequest),
    ("start_command", _START, _RUNS, wire.JobAccepted, wire.RunRequest),
    ("job_status", _JOB_STATUS, _READ_ONLY, wire.JobDetail, JobRef),
    ("read_output", _READ_OUTPUT, _READ_ONLY, wire.JobOutput, OutputRequest),
    ("cancel_job", _CANCEL, _STEERS, wire.JobAction, JobRef),
    ("get_cache_stats", _STATS, _READ_ONLY, wire.CacheStats, None),
    ("clear_cache", _CLEAR, _CLEARS, wire.Cleared, None),
    ("server_health", _HEALTH, _READ_ONLY, wire.Health, None),
    ("get_telemetry", _TELEMETRY, _READ_ONLY, wire.Telemetry, None),
    ("list_active_processes", _PROCESSES, _READ_ONLY, wire.ProcessList, None),
    ("get_process_status", _PROCESS_STATUS, _READ_ONLY, wire.ProcessDetail, ProcessRef),
    ("terminate_process", _TERMINATE, _STEERS, wire.ProcessDone, ProcessRef),
    ("pause_process", _PAUSE, _STEERS, wire.ProcessDone, ProcessRef),
    ("resume_process", _RESUME, _STEERS, wire.ProcessDone, ProcessRef),
    ("get_process_dashboard", _DASHBOARD, _READ_ONLY, wire.Dashboard, None),
]


def build_server(backend: ToolBackend) -> MCPServer:
    """An MCP server whose tools call ``backend``."""
    tools = _Tools(backend)
    return MCPServer(
        "runcache",
        title="runcache",
        instructions=INSTRUCTIONS,
        version=__version__,
        tools=[
            _tool(getattr(tools, name), description, hints, answer, request)
            for name, description, hints, answer, request in _TOOLS
        ],
    )


def _tool(
    fn: Callable[..., Awaitable[CallToolResult]],
    description: str,
    annotations: ToolAnnotations,
    answer: type[Struct],
    request: type[Struct] | None = None,
) -> Tool:
    """A tool whose schemas are the declared shapes: ``answer``'s for its output and,
    when it takes arguments, ``request``'s for its input.

    The SDK would derive both, and the model it reads arguments with, from the
    function's annotations; all three come from the declared shapes instead, so the
    tools and the HTTP API cannot drift apart and a field is listed once (a tool
    function takes ``**arguments``). The SDK reads the arguments leniently, as it
    always has; each tool then checks them with :func:`_checked`, with the API's
    messages.
    """
    tool = Tool.from_function(fn, description=description, annotations=annotations)
    if request is not None:
        tool.parameters = wire.shape_schema(request)
        tool.fn_metadata.arg_model = _arguments_model(request)
    else:
        tool.parameters = {"type": "object", "properties": {}, "title": f"{tool.name}Arguments"}
    # Read live by the SDK: the tool lists this schema, and answers with a CallToolResult
    # whose structured content the client checks against it.
    tool.fn_metadata.output_schema = wire.shape_schema(answer)
    return tool


class _Arguments(ArgModelBase):
    """The SDK's argument model, keeping the arguments no field declares, so that
    :func:`_checked` refuses them by name as the API does (the SDK would drop them)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {**super().model_dump_one_level(), **(self.model_extra or {})}


def _arguments_model(shape: type[Struct]) -> type[ArgModelBase]:
    """The SDK's model of a tool's arguments, made from the shape's fields: each of its
    type (coerced leniently by the SDK, as from a function's annotations) or None, so a
    missing one reaches :func:`_checked`, which answers with the API's message."""
    fields: dict[str, Any] = {
        field.name: (Optional[_lenient(field.type)], None)  # noqa: UP045 (a runtime type)
        for field in msgspec.structs.fields(shape)
    }
    model: type[ArgModelBase] = create_model(
        f"{shape.__name__}Arguments", __base__=_Arguments, **fields
    )
    return model


def _lenient(annotation: Any) -> Any:
    """``annotation`` as the SDK may coerce to, and no stricter: without its bounds, a
    choice of words as ``str`` (so a wrong one gets the API's message, not the SDK's)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _lenient(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, map(_lenient, typing.get_args(annotation)))
    return annotation


def _checked(shape: type[T], arguments: dict[str, Any]) -> T:
    """A tool's arguments checked as the API checks its requests, with its messages.
    An argument left out (None) takes the shape's default, as an absent field does."""
    present = {name: value for name, value in arguments.items() if value is not None}
    try:
        return wire.decode_request(shape, orjson.dumps(present))  # type: ignore[type-var]
    except RuncacheError as error:
        raise ToolError(error.message) from None


async def _call(operation: Awaitable[T]) -> T:
    """A backend call; a runcache error becomes a tool error with its message."""
    try:
        return await operation
    except RuncacheError as error:
        raise ToolError(error.message) from None


def _caller(ctx: Context | None) -> Caller | None:
    """Who made a tool call over HTTP (``/mcp``), for the audit log; None on stdio."""
    request = ctx.request_context.request if ctx is not None else None
    scope = getattr(request, "scope", None)
    return caller_of(scope) if isinstance(scope, dict) else None


def _viewer(ctx: Context | None) -> str | None:
    """Whose jobs a tool call over HTTP may see (:func:`runcache.engine.callers.viewer_of`); on
    stdio, where the agent is local, every job of the engine."""
    request = ctx.request_context.request if ctx is not None else None
    scope = getattr(request, "scope", None)
    return viewer_of(scope) if isinstance(scope, dict) else None


def _require_admin(ctx: Context | None) -> None:
    """Over HTTP with tokens set, emptying the cache needs the admin token, as on the API.

    The token gate in front of ``/mcp`` has already refused a request without a
    valid token, and recorded which one it was.
    """
    request = ctx.request_context.request if ctx is not None else None
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict) and scope.get(CREDENTIAL) == "token":
        raise ToolError("this operation needs the admin token")


def _progress_message(detail: wire.JobDetail) -> str:
    message = f"{detail.stdout_bytes + detail.stderr_bytes:,} bytes of output so far"
    if detail.status == "paused":
        message += " (paused)"
    if detail.last_output:
        message += f"; last line: {detail.last_output}"
    return message


def cut_output(result: wire.CommandResult, job_id: str, max_chars: int) -> ExecuteResult:
    """``result`` with each stream longer than ``max_chars`` cut to its head and tail."""
    fields = msgspec.structs.asdict(result)
    for stream in STREAMS:
        fields[stream] = _head_and_tail(fields[stream], stream, job_id, max_chars)
    return ExecuteResult(**fields, job_id=job_id)


def _head_and_tail(text: str, stream: str, job_id: str, max_chars: int) -> str:
    """The first and last ``max_chars / 2`` characters, and a line between saying what was
    left out and where: byte offsets of the stream, as ``read_output`` takes them."""
    if max_chars == 0 or len(text) <= max_chars:
        return text
    head = text[: max_chars // 2]
    tail = text[len(text) - (max_chars - len(head)) :]
    start = len(head.encode())
    end = len(text.encode()) - len(tail.encode())
    return (
        f"{head}\n[runcache: {len(text) - max_chars:,} characters ({end - start:,} bytes) of "
        f'{stream} left out here; read them with read_output(job_id="{job_id}", '
        f'stream="{stream}", offset={start}), then on from each page\'s next_offset up to '
        f"byte {end}]\n{tail}"
    )


def _answer(value: Struct) -> CallToolResult:
    """A tool's result: the shape as structured content, and as JSON text for clients
    that read only text."""
    text = TextContent(type="text", text=wire.encode(value).decode())
    return CallToolResult(content=[text], structured_content=wire.to_builtins(value))


def streamable_http(
    backend: ToolBackend,
    stateless: bool,
    *,
    session_idle: float = 300.0,
    body_limit: int = 1 << 20,
) -> tuple[ASGIApp, StreamableHTTPSessionManager]:
    """MCP's Streamable HTTP transport over ``backend``: the ASGI app that answers at
    ``/mcp``, and the session manager to run for as long as it serves.

    With several worker processes, or several servers behind a load balancer
    (``--mcp-stateless``), a session's next request may reach another process,
    which holds none of the SDK's per-process session state: the transport is
    ``stateless`` there, each request standing alone (the tools keep nothing
    between calls; a job they start is the deployment's with a shared store).
    The SDK's own Host and Origin check is off: it held only when ``--host`` was
    spelled 127.0.0.1, localhost or ::1, and let in pages of any port of those;
    :class:`~runcache.web.origins.OriginGuard` checks ``/mcp`` as it checks every route.

    A lone process keeps sessions, although no tool sends anything outside a call
    (progress streams in the call's own response either way): a client cancels a
    call with a ``notifications/cancelled`` sent in a request of its own, and only
    the session that runs the call can act on it. Stateless, the cancel reaches a
    fresh transport and is lost, and the run goes on (the test of a cancelled call
    over HTTP fails). So sessions stay, bounded: one idle ``session_idle`` seconds
    closes (no request in flight, no stream open), and :class:`~runcache.web.routes.mcp.
    McpEndpoint` keeps a few per client address.
    """
    server = build_server(backend)
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=stateless,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        session_idle_timeout=session_idle,
        max_request_body_size=body_limit,
    )
    route = next(route for route in app.routes if isinstance(route, Route))
    endpoint: ASGIApp = route.app
    return endpoint, server.session_manager


def serve_stdio(backend: ToolBackend, log_level: str = "INFO", log_format: str = "text") -> None:
    """Serve MCP on stdin/stdout until the client hangs up, then close the backend.

    SIGTERM (what an MCP client sends when stdin's closing was not enough) ends
    the server the same way, so commands running in this process die with it.
    """
    # Configured before the SDK's own set-up, which then leaves it alone.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(log_format))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    server = build_server(backend)
    log.info("runcache MCP server on stdio, using %s", backend.description)

    async def serve() -> None:
        try:
            await server.run_stdio_async()
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        backend.close_now()  # whatever the loop had no time left to close
        sys.stderr.flush()
