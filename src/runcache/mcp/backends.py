"""Where the MCP tools get their answers: an engine on the tools' own loop, or a server.

The tools (:mod:`runcache.mcp.tools`) are written once against :class:`ToolBackend`.
:class:`EngineBackend` calls an :class:`~runcache.engine.engine.Engine` directly: the
one ``runcache serve`` already runs (MCP over HTTP at ``/mcp``), or one of
``runcache mcp``'s own. :class:`ServerBackend` forwards to a runcache server
over HTTP with the blocking :class:`~runcache.client.http.Client`, each call in a
worker thread: one agent's few calls at a time, so threads cost nothing there,
while the engine side never holds one per waiting call.

Both raise :class:`~runcache.errors.RuncacheError` with the message the HTTP
API would answer, which the tools pass on as tool errors.

A call about jobs takes a ``viewer`` (:func:`runcache.engine.callers.viewer_of` of the
``/mcp`` request: whose jobs it may see, None for all), and a run started over
``/mcp`` is the caller's identity's job, as on the HTTP API. The server backend
ignores the viewer: the server it forwards to decides by the token it sends.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread
import msgspec

from runcache import wire
from runcache.client.http import Client
from runcache.engine import job_answers
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine
from runcache.errors import NotFound, RuncacheError, StoreError

log = logging.getLogger("runcache")

T = TypeVar("T")

#: How often a server's job is read while waiting for it to end.
POLL_SECONDS = 0.25

#: Who the audit log names for a tool call of ``runcache mcp`` on stdio: the local agent.
STDIO_CALLER = Caller("stdio")


class ToolBackend(Protocol):
    """What the MCP tools need, wherever the engine runs."""

    description: str

    #: Seconds a job is kept after it ends (``--job-retention``), which a task's time
    #: to live counts; None where it is not known, and jobs are then never tasks.
    job_retention: float | None

    async def start(
        self, request: wire.RunRequest, caller: Caller | None = None
    ) -> wire.JobAccepted:
        """Start (or join) a run in the background, or answer it from the cache;
        ``caller`` (the ``/mcp`` request's, or none on stdio) is what the audit log names."""

    async def wait(self, job_id: str, seconds: float, viewer: str | None = None) -> wire.JobDetail:
        """The job once it has ended, or as it is after ``seconds``."""

    async def output(
        self, job_id: str, stream: str, offset: int, limit: int, viewer: str | None = None
    ) -> wire.JobOutput: ...

    async def on_every_instance(self, job_id: str) -> bool:
        """Whether every instance serving the jobs finds this one now (a task may be
        handed out only then)."""

    async def cancel(self, job_id: str, viewer: str | None = None) -> wire.JobAction: ...

    async def leave(self, job_id: str, viewer: str | None = None) -> wire.JobAction:
        """Give up a job this backend started or joined; cancelled if nobody else wants it."""

    async def cache_stats(self) -> wire.CacheStats: ...

    async def clear(self, caller: Caller | None = None) -> wire.Cleared: ...

    async def health(self) -> wire.Health: ...

    async def telemetry(self) -> wire.Telemetry: ...

    async def processes(self, viewer: str | None = None) -> wire.ProcessList: ...

    async def process_status(self, pid: int, viewer: str | None = None) -> wire.ProcessDetail: ...

    async def steer_process(
        self, pid: int, verb: str, viewer: str | None = None
    ) -> wire.ProcessDone:
        """``terminate``, ``pause`` or ``resume`` a run by its pid."""

    async def dashboard(self, viewer: str | None = None) -> wire.Dashboard: ...

    async def aclose(self) -> None: ...

    def close_now(self) -> None:
        """Without a loop, what closing must not skip: no command outlives the backend."""


class EngineBackend:
    """The tools over an engine on the running loop: nothing waits in a thread.

    ``owned`` says whether closing the backend closes the engine (``runcache
    mcp``'s own) or leaves it to the server that serves it.
    """

    def __init__(self, engine: Engine, owned: bool = False) -> None:
        self.engine = engine
        self.owned = owned
        self._closed = False
        self.description = f"runcache in-process (store {engine.cache.store.description})"
        self.job_retention: float | None = engine.config.job_retention

    async def start(
        self, request: wire.RunRequest, caller: Caller | None = None
    ) -> wire.JobAccepted:
        job, _ = await self.engine.start(request, caller or STDIO_CALLER)
        return await job_answers.accepted(job)

    async def wait(self, job_id: str, seconds: float, viewer: str | None = None) -> wire.JobDetail:
        job = await self.engine.job(job_id, viewer)
        await job_answers.until_ended(job, seconds)
        return job_answers.detail(job)

    async def output(
        self, job_id: str, stream: str, offset: int, limit: int, viewer: str | None = None
    ) -> wire.JobOutput:
        return await job_answers.page(await self.engine.job(job_id, viewer), stream, offset, limit)

    async def cancel(self, job_id: str, viewer: str | None = None) -> wire.JobAction:
        return await job_answers.cancel(self.engine, await self.engine.job(job_id, viewer))

    async def on_every_instance(self, job_id: str) -> bool:
        """Without a job board this process is the one instance; with one, the job's
        record must be on it (published when the job was accepted, unless the board
        failed then: one more round is tried)."""
        sharing = self.engine.sharing
        if sharing is None:
            return True
        try:
            if await sharing.find(job_id) is not None:
                return True
            await sharing.publish_round()
            return await sharing.find(job_id) is not None
        except StoreError:
            return False

    async def leave(self, job_id: str, viewer: str | None = None) -> wire.JobAction:
        return await job_answers.leave(self.engine, await self.engine.job(job_id, viewer))

    async def cache_stats(self) -> wire.CacheStats:
        return await self.engine.cache_stats()

    async def clear(self, caller: Caller | None = None) -> wire.Cleared:
        cleared = await self.engine.clear()
        self.engine.audit.removed(caller or STDIO_CALLER, "clear", None)
        return cleared

    async def health(self) -> wire.Health:
        return await self.engine.health()

    async def telemetry(self) -> wire.Telemetry:
        return self.engine.telemetry.snapshot()

    async def processes(self, viewer: str | None = None) -> wire.ProcessList:
        return await job_answers.process_list(self.engine, viewer)

    async def process_status(self, pid: int, viewer: str | None = None) -> wire.ProcessDetail:
        return await job_answers.process_status(self.engine, str(pid), viewer)

    async def steer_process(
        self, pid: int, verb: str, viewer: str | None = None
    ) -> wire.ProcessDone:
        return await job_answers.steer_process(self.engine, str(pid), verb, viewer)

    async def dashboard(self, viewer: str | None = None) -> wire.Dashboard:
        return await job_answers.dashboard(self.engine, viewer)

    async def aclose(self) -> None:
        """Kill what still runs and release the store, when the engine is this backend's."""
        if self.owned and not self._closed:
            self._closed = True
            self.engine.runner.kill_all()
            await self.engine.aclose()
            await anyio.to_thread.run_sync(self.engine.close)

    def close_now(self) -> None:
        if self.owned and not self._closed:
            self._closed = True
            self.engine.close()


class ServerBackend:
    """The tools forwarded to a runcache server, with its tokens."""

    def __init__(self, client: Client, job_retention: float | None = None) -> None:
        self.client = client
        self.description = client.description
        #: The server's --job-retention, as its /health says (:meth:`connect`); None
        #: where it is not known (a server too old to say): its jobs are then not tasks.
        self.job_retention = job_retention

    @classmethod
    def connect(cls, client: Client) -> ServerBackend:
        """The backend of the server ``client`` reaches, its retention asked once: the
        tasks extension is declared (or not) when the MCP server is built."""
        try:
            retention = client.health().job_retention
        except RuncacheError as error:
            log.warning("runcache server %s: %s; MCP tasks off", client.description, error.message)
            return cls(client)
        return cls(client, None if retention is msgspec.UNSET else float(retention))

    async def _call(self, operation: Callable[..., T], *args: object) -> T:
        """A blocking client call in a worker thread, abandoned if the tool call is
        cancelled (closing the client then cuts its connection)."""
        return await anyio.to_thread.run_sync(
            functools.partial(operation, *args), abandon_on_cancel=True
        )

    async def start(
        self, request: wire.RunRequest, caller: Caller | None = None
    ) -> wire.JobAccepted:
        # The server it forwards to audits the request, with this adapter's token.
        return await self._call(self.client.start, request)

    async def wait(self, job_id: str, seconds: float, viewer: str | None = None) -> wire.JobDetail:
        with anyio.move_on_after(seconds):
            while True:
                detail = await self._call(self.client.job, job_id)
                if detail.status not in ("running", "paused"):
                    return detail
                await anyio.sleep(POLL_SECONDS)
        return await self._call(self.client.job, job_id)

    async def output(
        self, job_id: str, stream: str, offset: int, limit: int, viewer: str | None = None
    ) -> wire.JobOutput:
        return await self._call(self.client.output, job_id, stream, offset, limit)

    async def cancel(self, job_id: str, viewer: str | None = None) -> wire.JobAction:
        return await self._call(self.client.cancel, job_id)

    async def leave(self, job_id: str, viewer: str | None = None) -> wire.JobAction:
        return await self._call(self.client.leave, job_id)

    async def on_every_instance(self, job_id: str) -> bool:
        """Whether the server finds the job: it answers for every instance sharing its
        store, and each call of this adapter goes to it."""
        try:
            await self._call(self.client.job, job_id)
        except NotFound:
            return False
        return True

    async def cache_stats(self) -> wire.CacheStats:
        return await self._call(self.client.cache_stats)

    async def clear(self, caller: Caller | None = None) -> wire.Cleared:
        return await self._call(self.client.clear)

    async def health(self) -> wire.Health:
        return await self._call(self.client.health)

    async def telemetry(self) -> wire.Telemetry:
        return await self._call(self.client.telemetry)

    async def processes(self, viewer: str | None = None) -> wire.ProcessList:
        return await self._call(self.client.processes)

    async def process_status(self, pid: int, viewer: str | None = None) -> wire.ProcessDetail:
        return await self._call(self.client.process_status, pid)

    async def steer_process(
        self, pid: int, verb: str, viewer: str | None = None
    ) -> wire.ProcessDone:
        steer = {
            "terminate": self.client.terminate_process,
            "pause": self.client.pause_process,
            "resume": self.client.resume_process,
        }[verb]
        return await self._call(steer, pid)

    async def dashboard(self, viewer: str | None = None) -> wire.Dashboard:
        return await self._call(self.client.dashboard)

    async def aclose(self) -> None:
        self.client.close()

    def close_now(self) -> None:
        self.client.close()
