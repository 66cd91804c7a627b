"""Jobs every instance sees: this instance's jobs published to the job board, the others'
read from it, and control passed between them.

With a shared store the engine has a :class:`SharedJobs` on a
:class:`~runcache.stores.board.JobBoard`. Each local job is published as it
goes: its record when it starts, its output as the run's thread captures it
(batched: the thread only wakes the loop, as it does for followers, and one
sync per job at a time writes what piled up meanwhile), its status on pause and
resume, its final record at the end. A write the board refuses (Redis gone) is
tried again on the next heartbeat, so a job that ended meanwhile does not stay
``running`` once the board is back.

A job another instance runs is read through a :class:`RemoteJob`: a
:class:`~runcache.engine.jobs.Job` built from its record, whose output comes
from the board, so :mod:`runcache.engine.job_answers` answers it with the same
shapes and messages. Control on it goes through the board to the instance
running it, which applies it to its local job (:meth:`SharedJobs.apply`) and
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from runcache.engine.jobs import STREAMS, Job, OutputFacts
from runcache.errors import StoreError
from runcache.stores.board import (
    HEARTBEAT_SECONDS,
    ControlAnswer,
    ControlRequest,
    JobBoard,
    JobRecord,
)

if TYPE_CHECKING:
    from runcache.engine.engine import Engine

log = logging.getLogger("runcache")

#: Longest a follower's wait on the board lasts before it reads the record again.
WAIT_SECONDS = 1.0

#: How long the inbox waits for a request before asking again.
INBOX_SECONDS = 1.0

#: After writing output, a job's next sync waits this long, so that a command printing
#: fast has its lines written in batches, not one store call per line.
BATCH_SECONDS = 0.005

#: A running job's record (its sizes and last line, for listings) is written again with
#: its output at most this often; a change of status or pid is written at once.
RECORD_SECONDS = 0.5

#: How long a cancel waits for the run to end before answering (job_answers' wait).
END_WAIT_SECONDS = 5.0


def record_of(job: Job, instance: str) -> JobRecord:
    """A local job as the board keeps it."""
    facts = job.listing_facts()
    ended = job.ended
    body = job.body if ended else None
    return JobRecord(
        job_id=job.job_id,
        command=job.command,
        cache_key=job.cache_key,
        instance=instance,
        status=job.status,
        pid=job.pid,
        started_at=job.started_at,
        ended_at=job.started_at + job.runtime if ended else None,
        owners=sorted(job.owners),
        cacheable=job.cacheable,
        background=job.background,
        stdout_bytes=facts.stdout_bytes,
        stderr_bytes=facts.stderr_bytes,
        last_output=facts.last_output,
        return_code=facts.return_code,
        error=job.error,
        body=body.decode() if body is not None else None,
        cached=job.cached,
        coalesced=job.elsewhere,
        stale=job.stale,
    )


class RemoteJob(Job):
    """A job another instance runs, as this one reads it from the board: its record, and
    the output read so far (kept here while it runs; its result's, once ended)."""

    def __init__(self, record: JobRecord, board: JobBoard) -> None:
        super().__init__(
            record.job_id,
            record.command,
            record.cache_key,
            None,
            record.cacheable,
            record.background,
            clock=time.time,
        )
        self.board = board
        self._cursor = "0"
        self._buffers = {name: bytearray() for name in STREAMS}
        self.record = record
        self._update(record)

    def _update(self, record: JobRecord) -> None:
        self.record = record
        self.instance = record.instance
        self.started_at = self._started = record.started_at
        self.holders = int(record.background)
        self.owners = set(record.owners)
        self.error = record.error
        if record.ended_at is not None and self._ended is None:
            self.body = record.body.encode() if record.body is not None else None
            self.cached, self.elsewhere, self.stale = record.cached, record.coalesced, record.stale
            self.facts = self.listing_facts()
            self._ended = record.ended_at

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def pid(self) -> int | None:
        return self.record.pid

    def stream(self, name: str) -> bytearray:
        return self._buffers[name]

    def live(self, name: str) -> bytearray | None:
        return None if self.ended else self._buffers[name]

    def listing_facts(self) -> OutputFacts:
        record = self.record
        return OutputFacts(
            record.stdout_bytes, record.stderr_bytes, record.last_output, record.return_code
        )

    async def catch_up(self) -> None:
        await self._read(0)

    async def changed(self) -> None:
        if not self.ended:
            await self._read(WAIT_SECONDS)

    async def _read(self, timeout: float) -> None:
        """Take the output written since the last read (waiting up to ``timeout`` for
        some), and the final record once the end is marked (or the wait found nothing)."""
        if self.ended:
            return
        update = await self.board.wait(self.job_id, self._cursor, timeout)
        self._cursor = update.cursor
        for name, offset, data in update.chunks:
            buffer = self._buffers[name]
            if offset <= len(buffer) < offset + len(data):
                buffer += data[len(buffer) - offset :]
        if update.ended or (timeout > 0 and not update.chunks):
            record = await self.board.get(self.job_id)
            if record is not None:
                self._update(record)
        if update.chunks:
            self._wake()


class _Publisher:
    """What of one local job the board has: one sync at a time writes what is new."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sent = dict.fromkeys(STREAMS, 0)
        self.dirty = True
        self.syncing = False
        #: The status and pid last written, and when the record was.
        self.written: tuple[str, int | None] | None = None
        self.written_at = 0.0
        self.record_due = False
        self.finished = False
        #: Set while no sync runs: what the job was is on the board (unless it failed).
        self.idle = asyncio.Event()
        self.idle.set()


class SharedJobs:
    """This instance's side of the job board: publishing, control, heartbeat, reaping."""

    def __init__(self, board: JobBoard) -> None:
        self.board = board
        #: Started on the serving loop (:meth:`serve`); until then nothing is published.
        self.active = False
        self._publishers: dict[str, _Publisher] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._engine: Engine | None = None
        self._failing: str | None = None

    @property
    def instance(self) -> str:
        return self.board.instance

    # -- serving --------------------------------------------------------------------

    async def serve(self, engine: Engine) -> None:
        """Start the heartbeat (with the reaper) and the control inbox on this loop."""
        self._engine = engine
        self.active = True
        with contextlib.suppress(StoreError):
            await self.board.heartbeat()
        self._tasks = [
            asyncio.ensure_future(self._forever(self._beat, HEARTBEAT_SECONDS)),
            asyncio.ensure_future(self._forever(self._answer_inbox, 0)),
        ]

    async def aclose(self) -> None:
        self.active = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(StoreError):
            await self.board.aclose()

    async def _forever(self, step: Callable[[], Awaitable[None]], pause: float) -> None:
        """Run ``step`` again and again; a board that fails is logged once, then asked
        again after a pause, until it answers."""
        while True:
            try:
                await step()
                if self._failing is not None:
                    log.warning("job board reachable again: %s", self.board_name)
                    self._failing = None
            except StoreError as error:
                if self._failing is None:
                    log.warning("job board failed: %s", error.message)
                self._failing = error.message
                pause_now = max(pause, 0.5)
                await asyncio.sleep(pause_now)
                continue
            if pause:
                await asyncio.sleep(pause)

    @property
    def board_name(self) -> str:
        return type(self.board).__name__

    async def _beat(self) -> None:
        await self.board.heartbeat()
        for publisher in list(self._publishers.values()):
            if publisher.dirty and not publisher.syncing:  # a write the board refused
                self._kick(publisher)
        reaped = await self.board.reap()
        if reaped:
            log.warning("jobs of a silent instance marked failed: %s", ", ".join(reaped))

    async def _answer_inbox(self) -> None:
        for request in await self.board.inbox(INBOX_SECONDS):
            answer = await self.apply(request)
            await self.board.answer(request, answer)

    async def apply(self, request: ControlRequest) -> ControlAnswer:
        """Do what another instance asked of one of this instance's jobs."""
        engine = self._engine
        assert engine is not None
        publisher = self._publishers.get(request.job_id)
        if publisher is None:
            return ControlAnswer(done=False, status="unknown")
        job = publisher.job
        act = {
            "cancel": engine.cancel,
            "pause": engine.pause,
            "resume": engine.resume,
            "leave": engine.leave,
        }.get(request.verb)
        done = act is not None and act(job)
        if done and request.verb in ("cancel", "leave"):
            await job.ended_within(END_WAIT_SECONDS)
        # The requester reads the record next: it must say what was just done.
        self._kick(publisher)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(publisher.idle.wait(), END_WAIT_SECONDS)
        return ControlAnswer(done=done, status=job.status)

    # -- publishing -----------------------------------------------------------------

    def track(self, job: Job) -> None:
        """Publish ``job`` from now on, and each change of it."""
        if not self.active:
            return
        job.instance = self.instance
        publisher = _Publisher(job)
        self._publishers[job.job_id] = publisher
        job.on_change = lambda: self._kick(publisher)
        self._kick(publisher)

    def _kick(self, publisher: _Publisher) -> None:
        publisher.dirty = True
        if not publisher.syncing and not publisher.finished:
            publisher.syncing = True
            publisher.idle.clear()
            asyncio.ensure_future(self._sync(publisher))

    async def _sync(self, publisher: _Publisher) -> None:
        """Write what is new of a job until nothing is: its output, its record, its end."""
        try:
            while publisher.dirty and not publisher.finished:
                publisher.dirty = False
                if await self._write(publisher):
                    await asyncio.sleep(BATCH_SECONDS)
        except StoreError as error:
            publisher.dirty = True  # the next heartbeat tries again
            if self._failing is None:
                log.warning("job board failed: %s", error.message)
                self._failing = error.message
        finally:
            publisher.syncing = False
            publisher.idle.set()

    async def _write(self, publisher: _Publisher) -> bool:
        """Write what is new of the job; whether that was output."""
        job = publisher.job
        ended = job.ended
        chunks = []
        for name in STREAMS:
            live = job.live(name)
            if live is not None and len(live) > publisher.sent[name]:
                start = publisher.sent[name]
                chunks.append((name, start, bytes(live[start:])))
        if chunks:
            await self.board.append(job.job_id, chunks)
            for name, start, data in chunks:
                publisher.sent[name] = start + len(data)
        now = time.monotonic()
        state = (job.status, job.pid)
        if ended:
            await self.board.end(record_of(job, self.instance))
            publisher.finished = True
            self._publishers.pop(job.job_id, None)
        elif state != publisher.written or now - publisher.written_at >= RECORD_SECONDS:
            await self.board.publish(record_of(job, self.instance))
            publisher.written, publisher.written_at = state, now
        elif chunks and not publisher.record_due:  # its sizes: written a little later
            publisher.record_due = True
            asyncio.get_running_loop().call_later(RECORD_SECONDS, self._record_due, publisher)
        return bool(chunks)

    def _record_due(self, publisher: _Publisher) -> None:
        publisher.record_due = False
        self._kick(publisher)

    # -- reading and steering others' jobs --------------------------------------------

    async def find(self, job_id: str) -> RemoteJob | None:
        record = await self.board.get(job_id)
        return None if record is None else RemoteJob(record, self.board)

    async def listing(self) -> list[RemoteJob]:
        return [RemoteJob(record, self.board) for record in await self.board.listing()]

    async def control(self, job: RemoteJob, verb: str) -> ControlAnswer:
        """Ask the instance running ``job`` to do ``verb``; its answer, after which the
        job's record is read again. An instance that does not answer is a 503."""
        answer = await self.board.control(job.record, verb, END_WAIT_SECONDS + 2)
        if answer is None:
            raise StoreError(
                f"the instance running job {job.job_id} ({job.record.instance}) did not answer"
            )
        record = await self.board.get(job.job_id)
        if record is not None:
            job._update(record)
        return answer
