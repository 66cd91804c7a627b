"""MCP's tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663): a tool call
answered at once with a task, which the client polls with ``tasks/get`` until it
carries the tool's result.

The text followed is ``specification/2026-07-28/tasks.md`` of
modelcontextprotocol/ext-tasks at commit fb36f4006b7d (its ``draft/tasks.md`` at
80f9ef2b83bd says the same), the version the specification's repositories held on
2026-12-06.

A task IS a runcache job: its ``taskId`` is the job id (32 random hex digits, so
unguessable as the text asks), its status the job's (running and paused are
``working``; cancelled is ``cancelled``; every other end is ``completed``, with the
tool's result, an exit code other than 0 or a timeout included, since the text keeps
``failed`` for JSON-RPC errors, which a run never raises), its ``ttlMs`` the time
from its start until ``--job-retention`` after its end (from which the job may be
dropped: while it runs, the least it will be kept), and its ``pollIntervalMs``
:data:`POLL_INTERVAL_MS`. Every instance sharing the store answers ``tasks/get`` and
``tasks/cancel`` for it, through the job board (:mod:`runcache.engine.shared_jobs`),
and a task is handed out only once the board holds its job's record.

Only a ``tools/call`` whose own ``_meta`` declares the extension (in
``io.modelcontextprotocol/clientCapabilities``) may be answered with a task,
whatever the client declared before; ``tasks/get``, ``tasks/update`` and
``tasks/cancel`` without that declaration are refused with -32021. The SDK has no
runtime for tasks: :class:`TasksExtension` adds the three methods through its
extension interface, and :func:`answer_tasks`, a middleware, puts a tool's task in
place of its result (below the SDK's check of a ``tools/call`` result against the
protocol version's shape, which knows nothing of tasks).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp.types import CallToolResult, RequestParams
from mcp_types.jsonrpc import (
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
)
from pydantic import Field

from runcache import wire
from runcache.engine.callers import viewer_of
from runcache.errors import RuncacheError
from runcache.mcp.backends import ToolBackend

#: The extension's identifier, as clients declare it and the server advertises it.
EXTENSION = "io.modelcontextprotocol/tasks"

#: Where a request's ``_meta`` carries the capabilities its client declares for it.
CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"

#: Milliseconds a client is asked to leave between polls. A running job's record on
#: the job board trails its output by at most half a second (``RECORD_SECONDS``) and
#: its end is written at once, so polling faster would mostly read the same record
#: again; each poll is one board read (a Redis GET), so a thousand agents waiting
#: cost a thousand reads a second, and a task's end reaches its client half a
#: second after it, on average: little beside a command worth running as a task.
POLL_INTERVAL_MS = 1000

#: The job statuses of a task still ``working``.
_WORKING = frozenset({"running", "paused"})

#: What a client that leaves the extension out of a task request is answered.
_REQUIRED: dict[str, Any] = {"requiredCapabilities": {"extensions": {EXTENSION: {}}}}

#: The task a tool answers the call in flight with, set by :meth:`Tasks.offer` for
#: :func:`answer_tasks`. A context variable, since the SDK's tool layer between them
#: takes nothing but a tool result: each call runs in a context of its own.
_ANSWER: ContextVar[_Answer | None] = ContextVar("runcache_task_answer", default=None)


class _Answer:
    """The task a ``tools/call`` is answered with, once its tool has offered one."""

    task: dict[str, Any] | None = None


class TaskParams(RequestParams):
    """``tasks/get`` and ``tasks/cancel``: the task's id."""

    task_id: str = Field(alias="taskId")


class UpdateParams(TaskParams):
    """``tasks/update``: answers to a task's input requests (runcache asks none)."""

    input_responses: dict[str, Any] = Field(alias="inputResponses")


def declares_tasks(meta: Any) -> bool:
    """Whether a request's ``_meta`` declares the extension among its client's
    capabilities (the text counts only the request's own declaration)."""
    capabilities = meta.get(CLIENT_CAPABILITIES) if isinstance(meta, dict) else None
    extensions = capabilities.get("extensions") if isinstance(capabilities, dict) else None
    return isinstance(extensions, dict) and EXTENSION in extensions


async def answer_tasks(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """A ``tools/call`` that declares the extension answered with the task its tool
    offered (:meth:`Tasks.offer`), if it offered one; any other request as it is."""
    if ctx.method != "tools/call" or not declares_tasks(ctx.meta):
        return await call_next(ctx)
    answer = _Answer()
    token = _ANSWER.set(answer)
    try:
        result = await call_next(ctx)
    finally:
        _ANSWER.reset(token)
    return answer.task if answer.task is not None else result


class Tasks:
    """A backend's jobs as tasks: offered by the tools, read and steered by the methods.

    ``finished`` makes an ended job's tool result (what ``execute_command`` answers).
    """

    def __init__(
        self, backend: ToolBackend, finished: Callable[[wire.JobDetail], CallToolResult]
    ) -> None:
        self.backend = backend
        self.finished = finished

    async def offer(self, accepted: wire.JobAccepted, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Answer the call in flight with ``accepted``'s job as a task, when the call
        declared the extension and the job still runs (an ended one is answered at
        once) and is on the board, so every instance finds it. True when it will."""
        answer = _ANSWER.get()
        retention = self.backend.job_retention
        if answer is None or retention is None or accepted.status not in _WORKING:
            return False
        if not await self.backend.on_every_instance(accepted.job_id):
            return False
        detail = await self.backend.wait(accepted.job_id, 0, _viewer(ctx))
        if detail.status not in _WORKING:
            return False
        answer.task = {"resultType": "task", **self._task(detail, retention)}
        return True

    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        """``tasks/get``: the task as it is, with the tool's result once it has ended."""
        detail = await self._checked(ctx, params)
        retention = self.backend.job_retention
        assert retention is not None  # the methods are served only with a retention
        return {"resultType": "complete", **self._task(detail, retention)}

    async def update(
        self, ctx: ServerRequestContext[Any, Any], params: UpdateParams
    ) -> HandlerResult:
        """``tasks/update``: acknowledged. A run never asks its client anything, so no
        key is ever outstanding, and the text says to ignore responses to such keys."""
        await self._checked(ctx, params)
        return {"resultType": "complete"}

    async def cancel(
        self, ctx: ServerRequestContext[Any, Any], params: TaskParams
    ) -> HandlerResult:
        """``tasks/cancel``: the job is cancelled (killed with all it started, on
        whichever instance runs it), as ``cancel_job`` does; a task that has ended
        already is acknowledged as it is (the text lets its status stay)."""
        detail = await self._checked(ctx, params)
        if detail.status in _WORKING:
            try:
                await self.backend.cancel(detail.job_id, _viewer(ctx))
            except RuncacheError as error:
                if error.status >= 500:
                    raise MCPError(code=INTERNAL_ERROR, message=error.message) from None
                # Ended meanwhile (a 409): nothing left to cancel.
        return {"resultType": "complete"}

    async def _checked(
        self, ctx: ServerRequestContext[Any, Any], params: TaskParams
    ) -> wire.JobDetail:
        """The task's job, for a request that declares the extension and, over HTTP,
        names the task in its ``Mcp-Name`` header; an unknown task is invalid params."""
        if not declares_tasks(ctx.meta):
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message=f"Missing required client capability: {EXTENSION}",
                data=_REQUIRED,
            )
        headers = getattr(ctx.request, "headers", None)
        if headers is not None:
            named = decode_header_value(headers.get(MCP_NAME_HEADER))
            if named != params.task_id:
                raise MCPError(
                    code=HEADER_MISMATCH,
                    message="Mcp-Name header does not match the request's taskId",
                )
        try:
            return await self.backend.wait(params.task_id, 0, _viewer(ctx))
        except RuncacheError as error:
            if error.status < 500:  # no such job (or none this caller may see)
                raise MCPError(
                    code=INVALID_PARAMS, message="Failed to retrieve task: Task not found"
                ) from None
            raise MCPError(code=INTERNAL_ERROR, message=error.message) from None

    def _task(self, detail: wire.JobDetail, retention: float) -> dict[str, Any]:
        """The job as the text's ``Task``, with the tool's result once completed."""
        ended = detail.started_at + detail.runtime
        task: dict[str, Any] = {
            "taskId": detail.job_id,
            "status": _status(detail.status),
            "createdAt": _iso(detail.started_at),
            "lastUpdatedAt": _iso(ended),
            "ttlMs": round((detail.runtime + retention) * 1000),
            "pollIntervalMs": POLL_INTERVAL_MS,
        }
        if detail.status in _WORKING:
            line = detail.last_output or "(no output yet)"
            task["statusMessage"] = f"(paused) {line}" if detail.status == "paused" else line
        elif detail.status == "cancelled":
            task["statusMessage"] = "the job was cancelled"
        else:
            task["statusMessage"] = f"the job {detail.status.replace('_', ' ')}"
            task["result"] = self.finished(detail).model_dump(
                by_alias=True, mode="json", exclude_none=True
            )
        return task


class TasksExtension(Extension):
    """The extension as the SDK takes one: its three methods, advertised under
    ``capabilities.extensions`` with no settings (the text defines none)."""

    identifier = EXTENSION

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks

    def methods(self) -> Sequence[MethodBinding]:
        return (
            MethodBinding("tasks/get", TaskParams, self.tasks.get),
            MethodBinding("tasks/update", UpdateParams, self.tasks.update),
            MethodBinding("tasks/cancel", TaskParams, self.tasks.cancel),
        )


def _status(job_status: str) -> str:
    """A job's status as a task's: the text keeps ``failed`` for JSON-RPC errors."""
    if job_status in _WORKING:
        return "working"
    return "cancelled" if job_status == "cancelled" else "completed"


def _iso(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601, in UTC to the millisecond."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _viewer(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """Whose jobs a request over HTTP may see; on stdio every job of the engine."""
    scope = getattr(ctx.request, "scope", None)
    return viewer_of(scope) if isinstance(scope, dict) else None
