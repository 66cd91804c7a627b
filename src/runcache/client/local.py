"""An engine in this process, behind the operations of a server's client: :class:`LocalClient`.

``runcache`` commands without ``--server`` (and ``runcache mcp`` without one) run
the engine themselves; this client makes its coroutines blocking calls, as
:class:`~runcache.client.http.Client`'s are, so the CLI has one code path
whichever way it was started.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from anyio.from_thread import start_blocking_portal

from runcache import wire
from runcache.client import local_store, sse
from runcache.client.base import FINAL_EVENTS, BaseClient
from runcache.config import Config
from runcache.engine import entry_answers, job_answers
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine
from runcache.errors import BadRequest
from runcache.wire import CacheStats, Cleared, CommandResult, Health, Telemetry

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from runcache.engine.jobs import Job

__all__ = ["LocalClient"]

#: Who the engine logs and audits as the caller of this client's requests.
LOCAL_CALLER = Caller("local")

#: A job event's id: the bytes of stdout and of stderr sent up to and with it.
_EVENT_ID = re.compile(r"^(\d+):(\d+)$")


class LocalClient(BaseClient):
    """An engine in this process, behind the same interface as :class:`Client`.

    The engine's coroutines run on an event loop of the client's own, in a
    thread, so the calls here block like the HTTP client's and may come from
    any thread. Each run goes through the engine's one door, as the API's do.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.description = f"runcache in-process (store {engine.cache.store.description})"
        self._loop: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._loop.__enter__()

    @classmethod
    def from_environment(cls, store: str | None = None) -> LocalClient:
        """An engine with the settings of the environment, on ``store`` (else the one
        :func:`~runcache.client.local_store` names).

        A stale answer's refresh is not started in this process: the process ends
        with its command's answer, and a refresh it started would be killed with it.
        The caller starts one that outlives it (``runcache run`` starts a detached
        ``runcache run --refresh``).
        """
        engine = Engine.from_config(Config.load({"store": store or local_store()}))
        engine.refresh_stale = False
        return cls(engine)

    def _execute(self, request: wire.CommandRequest) -> CommandResult:
        return self._portal.call(self.engine.run, request, LOCAL_CALLER).result()

    def cache_stats(self) -> CacheStats:
        return self._portal.call(self.engine.cache_stats)

    def clear(self) -> Cleared:
        return self._portal.call(self.engine.clear)

    def health(self) -> Health:
        return self._portal.call(self.engine.health)

    def telemetry(self) -> Telemetry:
        return self.engine.telemetry.snapshot()

    # -- jobs, as Client has them: what following a run needs ------------------------

    def _start(self, request: wire.CommandRequest) -> wire.JobAccepted:
        return self._portal.call(self._started, request)

    async def _started(self, request: wire.CommandRequest) -> wire.JobAccepted:
        job, _ = await self.engine.start(request, LOCAL_CALLER)
        return await job_answers.accepted(job)

    def job(self, job_id: str) -> wire.JobDetail:
        return self._portal.call(lambda: job_answers.detail(self.engine.jobs.get(job_id)))

    def output(
        self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int | None = None
    ) -> wire.JobOutput:
        size = job_answers.DEFAULT_PAGE_BYTES if limit is None else limit
        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        return self._portal.call(job_answers.page, job, stream, offset, size)

    def events(self, job_id: str, last_event_id: str | None = None) -> sse.EventStream:
        """The job's events as :meth:`Client.events` gives them, read from the engine's job
        on this client's loop one at a time (the data keeps carriage returns here: no
        wire format forces lines)."""
        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        positions = _positions(last_event_id)
        while True:
            event = self._portal.call(_next_event, job, positions)
            yield event
            if event.kind in FINAL_EVENTS:
                return

    def leave(self, job_id: str) -> wire.JobAction:
        job = self._portal.call(lambda: self.engine.jobs.get(job_id))
        return self._portal.call(job_answers.leave, self.engine, job)

    def entries(
        self, prefix: str = "", offset: int = 0, limit: int | None = None, scope: str | None = None
    ) -> wire.CacheEntryList:
        size = entry_answers.DEFAULT_LIST if limit is None else limit
        return self._portal.call(entry_answers.listing, self.engine, prefix, offset, size, scope)

    def entry(self, key: str) -> wire.CacheEntryDetail:
        return self._portal.call(entry_answers.detail, self.engine, key)

    def delete_entry(self, key: str) -> wire.Deleted:
        return self._portal.call(entry_answers.delete, self.engine, key, "local")

    def _invalidate(self, request: wire.InvalidateRequest) -> wire.Deleted:
        return self._portal.call(entry_answers.invalidate, self.engine, request, "local")

    def close(self) -> None:
        """Kill commands still running, stop the client's loop, and release the store."""
        self.engine.runner.kill_all()
        self._portal.call(self.engine.aclose)
        self._loop.__exit__(None, None, None)
        self.engine.close()


def _positions(last_event_id: str | None) -> dict[str, int]:
    """Where a reader resumes: after the id of the last event it read, as the API reads
    ``Last-Event-ID``."""
    if last_event_id is None or not last_event_id.strip():
        return {"stdout": 0, "stderr": 0}
    match = _EVENT_ID.match(last_event_id.strip())
    if match is None:
        raise BadRequest(
            "Last-Event-ID must be <stdout offset>:<stderr offset>, as the events of this job carry"
        )
    return {"stdout": int(match[1]), "stderr": int(match[2])}


async def _next_event(job: Job, positions: dict[str, int]) -> sse.Event:
    """The next event of ``job`` for a reader at ``positions`` (moved past it): new output
    on either stream, else the result once the job has ended, else wait for a change.

    The API's event stream does the same for many readers at once, written as
    bytes; one reader in process takes one event per call through the portal. The
    reader counts as a follower while it waits, so the run's thread wakes it on new
    output; output that came before is seen by its length, so none is missed.
    """
    job.followers += 1
    try:
        while True:
            ended = job.ended
            for name in job_answers.STREAMS:
                if not (ended or job_answers.may_have_more(job, name, positions[name])):
                    continue
                data, next_offset, _, _ = await job_answers.read_stream(
                    job, name, positions[name], job_answers.EVENT_BYTES
                )
                if next_offset != positions[name]:
                    positions[name] = next_offset
                    event_id = f"{positions['stdout']}:{positions['stderr']}"
                    return sse.Event(name, data.decode("utf-8", "replace"), event_id)
            if ended:
                body = job_answers.result_json(job)
                if body is None:
                    return sse.Event("error", wire.encode(wire.Error(job.error or "")).decode())
                return sse.Event("result", body.decode())
            await job.changed()
    finally:
        job.followers -= 1
