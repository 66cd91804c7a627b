"""The MCP adapter: runcache's operations as tools for AI agents, over stdio or HTTP.

The tools keep the names agent setups for this API already call, and add the
reference client's process tools and runcache's jobs. A few are offered unless
``--mcp-tools`` says otherwise (:data:`~runcache.mcp.shapes.DEFAULT_TOOLS`): every
tool listed costs each conversation its schema, so the default list stays under
8 KB, its schemas the API's shapes without what the server checks anyway (patterns,
bounds of length) and with their first sentences only. Each is a thin call on a
:class:`~runcache.mcp.backends.ToolBackend`, so the tools behave the same
whether they run in ``runcache serve`` (Streamable HTTP at ``/mcp``), forward
to a server, or run an engine in ``runcache mcp``'s own process. A runcache
error comes back as an MCP tool error carrying its message; the server keeps
serving. On stdio, stdout is the protocol, so every log line goes to stderr.

A command may run for minutes, and MCP clients give up on a call that sends
nothing for about a minute: ``execute_command`` runs the command as a job,
reports progress every ``PROGRESS_SECONDS`` while it runs, and returns at most
``max_output_chars`` of each stream (the head and the tail, with a line between
them saying how to read the rest with ``read_output``), with links to the whole
streams as resources (``runcache://jobs/{job_id}/stdout``, read in pages). A call
the client cancels gives the job up: it is killed unless someone else still wants it.
A client that declares MCP's tasks extension on its call may get the job as a task
instead, polled to the same result (:mod:`runcache.mcp.tasks`).

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
import re
import signal
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Optional, TypeVar

import anyio
import msgspec
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ResourceLink, TextContent, ToolAnnotations
from msgspec import Struct
from pydantic import (
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    create_model,
    model_validator,
)
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
    DEFAULT_TOOLS,
    MAX_RESULT_CHARS,
    TOOL_NAMES,
    ExecuteRequest,
    ExecuteResult,
    JobRef,
    OutputRequest,
    ProcessRef,
)
from runcache.mcp.tasks import Tasks, TasksExtension, answer_tasks

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between progress notifications while a command runs (clients wait ~60 s).
PROGRESS_SECONDS = 2.0

INSTRUCTIONS = (
    "runcache runs shell commands and caches successful results: the same command asked "
    "again answers at once from the cache. execute_command runs one and waits; "
    "start_command runs one in the background, followed with job_status and read_output "
    "and stopped with cancel_job."
)

_RUNS = ToolAnnotations(destructive_hint=True, open_world_hint=True)
_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
_CLEARS = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)

_STEERS = ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False)

_EXECUTE = (
    "Run a shell command (/bin/sh -c) and wait for its result (stdout, stderr, return_code, "
    "cached, job_id...), from the cache when it holds one; it is killed after timeout "
    "seconds (the server's --default-timeout when omitted). Each stream past max_output_chars "
    f"(default {DEFAULT_OUTPUT_CHARS:,}) comes back as its head and tail, the rest readable "
    "with read_output or the linked resources."
)
_START = (
    "Start a shell command in the background and return its job_id at once (joining an "
    "identical run in flight, or answered from the cache); the same limits as execute_command."
)
_JOB_STATUS = (
    "A job's status (running, paused, completed, failed, timed_out or cancelled), bytes of "
    "output and last line, and its result (output whole) once it has ended."
)
_READ_OUTPUT = (
    "Read a page of a job's stdout or stderr, while it runs or after: at most limit bytes "
    f"(default {DEFAULT_READ_BYTES:,}) from a byte offset, with next_offset and eof."
)
_CANCEL = (
    "Cancel a running job: kill it and everything it started (its PID namespace, or its "
    "process group where namespaces are not allowed). Its result is not cached."
)
_PROCESSES = "List the running commands by pid, with their status, runtime and last line."
_PROCESS_STATUS = "One running command by its pid."
_TERMINATE = "Kill a running command and everything it started, by its pid (as cancel_job does)."
_PAUSE = (
    "Pause a running command and everything it started (SIGSTOP), by its pid; paused time "
    "does not count towards its timeout."
)
_RESUME = "Resume a paused command and everything it started (SIGCONT), by its pid."
_DASHBOARD = "The running commands and the machine's load."
_STATS = "The cache's statistics: entries held, hits, misses, evictions and hit rate."
_CLEAR = "Empty the cache and reset its statistics (needs the admin right)."
_HEALTH = "The service's health, version, cache statistics and uptime."
_TELEMETRY = "Execution telemetry: commands run, success rate, average time, system load."


class _Tools:
    """The tools, each a coroutine over one backend."""

    def __init__(self, backend: ToolBackend) -> None:
        self.backend = backend
        self.tasks = Tasks(backend, functools.partial(finished, max_chars=DEFAULT_OUTPUT_CHARS))

    async def execute_command(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        request = _checked(ExecuteRequest, arguments)
        accepted = await _call(self.backend.start(request, _caller(ctx)))
        # A task's result is made by whichever instance the client polls, which knows
        # nothing of this call: a call that sets its own cut is answered here.
        if arguments.get("max_output_chars") is None and await self._as_task(accepted, ctx):
            return _AS_TASK
        detail = await self._until_ended(accepted.job_id, ctx)
        return finished(detail, request.max_output_chars)

    async def _as_task(self, accepted: wire.JobAccepted, ctx: Context | None) -> bool:
        """Whether the call is answered with the job as a task (:mod:`runcache.mcp.tasks`)."""
        return ctx is not None and await _call(self.tasks.offer(accepted, ctx.request_context))

    async def _until_ended(self, job_id: str, ctx: Context | None) -> wire.JobDetail:
        """Wait for the job, reporting progress; a cancelled call gives the job up."""
        viewer = _viewer(ctx)
        progress = _Progress()
        try:
            while True:
                detail = await _call(self.backend.wait(job_id, PROGRESS_SECONDS, viewer))
                if detail.status not in ("running", "paused"):
                    return detail
                if ctx is not None:
                    await ctx.report_progress(progress.next(detail), None, _last_line(detail))
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self.backend.leave(job_id, viewer)
                except RuncacheError as error:
                    log.warning("could not give up job %s: %s", job_id, error.message)
            raise

    async def start_command(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        request = _checked(wire.RunRequest, arguments)
        accepted = await _call(self.backend.start(request, _caller(ctx)))
        return _AS_TASK if await self._as_task(accepted, ctx) else _answer(accepted)

    async def job_status(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        job = _checked(JobRef, arguments)
        return _answer(await _call(self.backend.wait(job.job_id, 0, _viewer(ctx))))

    async def read_output(self, ctx: Context | None = None, **arguments: Any) -> CallToolResult:
        page = _checked(OutputRequest, arguments)
        return _answer(
            await _call(
                self.backend.output(page.job_id, page.stream, page.offset, page.limit, _viewer(ctx))
            ),
            _output_links(page.job_id),
        )

    async def output_resource(
        self,
        job_id: str,
        stream: str,
        offset: int = 0,
        limit: int = DEFAULT_READ_BYTES,
        ctx: Context | None = None,
    ) -> str:
        """A page of a job's stream as a resource (:data:`OUTPUT_URI`), checked as
        ``read_output`` checks its arguments, a refusal in the API's words."""
        arguments = {"job_id": job_id, "stream": stream, "offset": offset, "limit": limit}
        try:
            page = _checked(OutputRequest, arguments)
            answer = await _call(
                self.backend.output(page.job_id, page.stream, page.offset, page.limit, _viewer(ctx))
            )
        except ToolError as error:
            raise ResourceError(str(error)) from None
        return answer.data

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


#: Each tool: its description, hints, answer shape and (when it takes arguments) request
#: shape, in the order of :data:`~runcache.mcp.shapes.TOOL_NAMES`.
_TOOLS: dict[str, tuple[str, ToolAnnotations, type[Struct], type[Struct] | None]] = {
    "execute_command": (_EXECUTE, _RUNS, ExecuteResult, ExecuteRequest),
    "start_command": (_START, _RUNS, wire.JobAccepted, wire.RunRequest),
    "read_output": (_READ_OUTPUT, _READ_ONLY, wire.JobOutput, OutputRequest),
    "job_status": (_JOB_STATUS, _READ_ONLY, wire.JobDetail, JobRef),
    "cancel_job": (_CANCEL, _STEERS, wire.JobAction, JobRef),
    "get_cache_stats": (_STATS, _READ_ONLY, wire.CacheStats, None),
    "clear_cache": (_CLEAR, _CLEARS, wire.Cleared, None),
    "server_health": (_HEALTH, _READ_ONLY, wire.Health, None),
    "get_telemetry": (_TELEMETRY, _READ_ONLY, wire.Telemetry, None),
    "list_active_processes": (_PROCESSES, _READ_ONLY, wire.ProcessList, None),
    "get_process_status": (_PROCESS_STATUS, _READ_ONLY, wire.ProcessDetail, ProcessRef),
    "terminate_process": (_TERMINATE, _STEERS, wire.ProcessDone, ProcessRef),
    "pause_process": (_PAUSE, _STEERS, wire.ProcessDone, ProcessRef),
    "resume_process": (_RESUME, _STEERS, wire.ProcessDone, ProcessRef),
    "get_process_dashboard": (_DASHBOARD, _READ_ONLY, wire.Dashboard, None),
}
assert tuple(_TOOLS) == TOOL_NAMES

#: Where a job's whole stdout or stderr is read, a page at a time (bytes from ``offset``,
#: ``limit`` at most; an empty page past the end).
OUTPUT_URI = "runcache://jobs/{job_id}/{stream}{?offset,limit}"

#: What a tool answers when :func:`~runcache.mcp.tasks.answer_tasks` puts a task in its place.
_AS_TASK = CallToolResult(content=[])

#: What a tool tells clients of its results' size: Claude Code lifts its own cut to it.
_META = {"anthropic/maxResultSizeChars": MAX_RESULT_CHARS}


def build_server(backend: ToolBackend, tools: tuple[str, ...] = DEFAULT_TOOLS) -> MCPServer:
    """An MCP server whose ``tools`` call ``backend``, and whose resources are the jobs'
    output.

    ``clear_cache`` is listed only to a caller with the admin right: over HTTP
    (``/mcp``) the admin token, or any caller of a server without tokens. On stdio
    the agent is the local user who started the adapter, and sees it (a server the
    adapter forwards to still asks for its admin token).
    """
    calls = _Tools(backend)
    server = MCPServer(
        "runcache",
        title="runcache",
        instructions=INSTRUCTIONS,
        version=__version__,
        tools=[_tool(getattr(calls, name), *_TOOLS[name]) for name in tools],
        middleware=[_hide_clear_from_non_admins, answer_tasks],
        extensions=[TasksExtension(calls.tasks)] if backend.job_retention is not None else [],
    )
    server.resource(
        OUTPUT_URI,
        name="job_output",
        description="A page of a job's stdout or stderr: at most limit bytes (default "
        f"{DEFAULT_READ_BYTES:,}) from byte offset (default 0); the next page starts at "
        "offset plus the page's length in UTF-8 bytes, and an empty page is past the end.",
        mime_type="text/plain",
    )(calls.output_resource)
    return server


async def _hide_clear_from_non_admins(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """``tools/list`` without ``clear_cache`` for a caller over HTTP with a plain token:
    a tool it can only be refused costs its conversation for nothing."""
    result = await call_next(ctx)
    scope = getattr(ctx.request, "scope", None)
    if (
        ctx.method == "tools/list"
        and isinstance(result, dict)  # the answer as it goes on the wire
        and isinstance(scope, dict)
        and scope.get(CREDENTIAL) == "token"
    ):
        kept = [tool for tool in result.get("tools", ()) if tool.get("name") != "clear_cache"]
        return {**result, "tools": kept}
    return result


def _tool(
    fn: Callable[..., Awaitable[CallToolResult]],
    description: str,
    annotations: ToolAnnotations,
    answer: type[Struct],
    request: type[Struct] | None = None,
) -> Tool:
    """A tool whose input schema is ``request``'s, made lean (:func:`_lean_schema`).

    The SDK would derive its schema, and the model it reads arguments with, from the
    function's annotations; both come from the declared shape instead, so the tools
    and the HTTP API cannot drift apart and a field is listed once (a tool function
    takes ``**arguments``). The SDK reads the arguments leniently; each tool then
    checks them with :func:`_checked`, with the API's messages.

    It declares no output schema: ``answer``'s would double the size of the list
    (the structured content is still that shape, the one the API answers with and
    its OpenAPI document describes).
    """
    tool = Tool.from_function(
        _as_tool_errors(fn), description=description, annotations=annotations, meta=_META
    )
    if request is not None:
        tool.parameters = _lean_schema(wire.shape_schema(request))
        tool.fn_metadata.arg_model = _arguments_model(request)
    else:
        tool.parameters = {"type": "object", "properties": {}}
    tool.fn_metadata.output_schema = None
    return tool


def _as_tool_errors(
    fn: Callable[..., Awaitable[CallToolResult]],
) -> Callable[..., Awaitable[CallToolResult]]:
    """``fn`` answering a refusal as a tool error result whose text is the API's message
    alone (the SDK would put "Error executing tool NAME: " before it)."""

    @functools.wraps(fn)
    async def answering(*args: Any, **kwargs: Any) -> CallToolResult:
        try:
            return await fn(*args, **kwargs)
        except ToolError as error:
            return CallToolResult(
                content=[TextContent(type="text", text=str(error))], is_error=True
            )

    return answering


#: Keywords a tool's input schema leaves to the server's own checks (with its messages):
#: titles, and bounds whose text (a Unicode pattern, a length) costs more than it guides.
_LEFT_TO_THE_SERVER = frozenset(
    {
        "title",
        "pattern",
        "propertyNames",
        "maxLength",
        "maxProperties",
        "maxItems",
        "minItems",
        "not",
    }
)


def _lean_schema(node: Any, top: bool = True) -> Any:
    """A tool's input schema as a model reads it: the shape's, without what the server
    checks anyway (:data:`_LEFT_TO_THE_SERVER`), an optional field's "or null" (leaving
    it out is how to say null), and each description cut to its first sentence."""
    if isinstance(node, list):
        return [_lean_schema(item, False) for item in node]
    if not isinstance(node, dict):
        return node
    options = node.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        (inner,) = (option for option in options if option != {"type": "null"})
        node = {**inner, **{key: value for key, value in node.items() if key != "anyOf"}}
        if node.get("default", 0) is None:
            del node["default"]
    lean: dict[str, Any] = {}
    for key, value in node.items():
        if key in _LEFT_TO_THE_SERVER:
            continue
        if key == "description":
            if not top and isinstance(value, str):
                lean[key] = _first_sentence(value)
        elif key == "properties":
            lean[key] = {name: _lean_schema(field, False) for name, field in value.items()}
        else:
            lean[key] = _lean_schema(value, False)
    return lean


def _first_sentence(text: str) -> str:
    """``text`` up to its first full stop, semicolon or colon (one not closing a quote)."""
    match = re.match(r'(.+?)(?<!")[.;:](?=\s|$)', text)
    return f"{match.group(1)}." if match else text


class _Arguments(ArgModelBase):
    """The SDK's argument model, keeping the arguments no field declares, so that
    :func:`_checked` refuses them by name as the API does (the SDK would drop them)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _as_sent_when_refused(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """Arguments the lenient model cannot read (a word where a number goes) are kept
        as sent, for :func:`_checked` to refuse with the API's message: pydantic's text,
        and its link to its documentation, never reach a client."""
        try:
            return handler(data)
        except ValidationError:
            if not isinstance(data, dict):
                raise
            return cls.model_construct(**data)

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
        return wire.decode_request(shape, msgspec.json.encode(present))  # type: ignore[type-var]
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


class _Progress:
    """A run's progress as MCP reports it: the bytes it has printed (stdout and stderr),
    with no total, since how much a command will print is not known.

    MCP wants each report's ``progress`` greater than the one before, and a client
    waits only as long as reports keep coming: a report while nothing new was
    printed adds a fraction that stays under the next byte (1/2, 2/3, 3/4...), so
    its whole part is still the bytes printed.
    """

    def __init__(self) -> None:
        self.printed = -1
        self.quiet = 0

    def next(self, detail: wire.JobDetail) -> float:
        printed = detail.stdout_bytes + detail.stderr_bytes
        self.quiet = self.quiet + 1 if printed <= self.printed else 0
        self.printed = max(printed, self.printed)
        return self.printed + self.quiet / (self.quiet + 1)


def _last_line(detail: wire.JobDetail) -> str:
    """A progress report's message: the last line printed, and whether the run is paused."""
    line = detail.last_output or "(no output yet)"
    return f"(paused) {line}" if detail.status == "paused" else line


def _output_links(job_id: str) -> list[ResourceLink]:
    """Links to a job's whole stdout and stderr (:data:`OUTPUT_URI`)."""
    return [
        ResourceLink(
            type="resource_link",
            name=f"{stream} of job {job_id}",
            uri=f"runcache://jobs/{job_id}/{stream}",
            mime_type="text/plain",
            description=f"The whole {stream}, read in pages with ?offset=BYTES&limit=BYTES.",
        )
        for stream in STREAMS
    ]


def finished(detail: wire.JobDetail, max_chars: int) -> CallToolResult:
    """An ended job as ``execute_command`` answers it: its result cut to ``max_chars``
    per stream, with links to the whole streams; a job that ended without a result
    (it never ran) is a tool error carrying why."""
    if isinstance(detail.result, msgspec.UnsetType):
        text = detail.error or f"job {detail.job_id} ended without a result"
        return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)
    cut = cut_output(detail.result, detail.job_id, max_chars)
    return _answer(cut, _output_links(detail.job_id))


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


def _answer(value: Struct, links: list[ResourceLink] | None = None) -> CallToolResult:
    """A tool's result: the shape as structured content, and as JSON text for clients
    that read only text; then ``links``, if any."""
    text = TextContent(type="text", text=wire.encode(value).decode())
    return CallToolResult(
        content=[text, *(links or [])], structured_content=wire.to_builtins(value)
    )


def streamable_http(
    backend: ToolBackend,
    stateless: bool,
    *,
    session_idle: float = 300.0,
    body_limit: int = 1 << 20,
    tools: tuple[str, ...] = DEFAULT_TOOLS,
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
    server = build_server(backend, tools)
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


def serve_stdio(
    backend: ToolBackend,
    log_level: str = "INFO",
    log_format: str = "text",
    tools: tuple[str, ...] = DEFAULT_TOOLS,
) -> None:
    """Serve MCP on stdin/stdout until the client hangs up, then close the backend.

    SIGTERM (what an MCP client sends when stdin's closing was not enough) ends
    the server the same way, so commands running in this process die with it.
    """
    # Configured before the SDK's own set-up, which then leaves it alone.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(log_format))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    server = build_server(backend, tools)
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
