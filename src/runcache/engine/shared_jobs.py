"""Jobs every instance sees: this instance's jobs published to the job board, the others'
read from it, and control passed between them.

With a shared store the engine has a :class:`SharedJobs` on a
:class:`~runcache.stores.board.JobBoard`. Each local job is published as it
goes, in rounds: one board transaction takes what every job printed since the
last round, the records that are due (a running job's sizes and last line at
most every :data:`RECORD_SECONDS`) and the ends; rounds are at least
:data:`ROUND_SECONDS` apart. A run thread that captures output only notes it
(the first note since a round wakes the loop); a change of state (a new job, a
pause, a resume, a lease taken, an end) has a round due at once. A round the board
refuses (Redis gone) is written again by the next, so a job that ended
meanwhile does not stay ``running`` once the board is back; and a board that
lost this instance's heartbeat (a Redis restarted empty) has every running job
written again, while the reaper rests for a timeout: the others' heartbeats
may be missing for the same reason, not because they died.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runcache.engine.jobs import STREAMS, Job, OutputFacts
from runcache.errors import StoreError
from runcache.stores.board import (
    HEARTBEAT_SECONDS,
    Chunk,
    ControlAnswer,
    ControlRequest,
    JobBoard,
    JobRecord,
    Round,
)

if TYPE_CHECKING:
    from runcache.engine.engine import Engine

log = logging.getLogger("runcache")

#: Longest a follower's wait on the board lasts before it reads the record again.
WAIT_SECONDS = 1.0

#: How long the inbox waits for a request before asking again.
INBOX_SECONDS = 1.0

#: The shortest time between two publishing rounds: a round writes what every job
#: printed meanwhile in one transaction, so commands printing fast cost the loop a
#: round a tick, not a store call a line (and a line printed after a quiet spell goes
#: at once).
ROUND_SECONDS = 0.015

#: How long a round woken by new output waits for the rest of it: a command's line and
#: its newline often reach the run's thread apart, a fraction of a millisecond apart.
GATHER_SECONDS = 0.001

#: A running job's record (its sizes and last line, for listings) is written again at
#: most this often; a change of status, pid or lease, and an end, are written at once.
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
        lease=job.lease,
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
        pool=job.pool,
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
            self._wake_readers()


#: What of a job's record is written at once when it changes: status, pid, lease token.
State = tuple[str, int | None, str | None]


class _Publisher:
    """What of one local job the board has: the output sent, the record last written."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sent = dict.fromkeys(STREAMS, 0)
        #: The status, pid and lease last written (None: write the record), and when.
        self.written: State | None = None
        self.written_at = 0.0
        #: Output was written since the record was (its sizes and last line are behind).
        self.behind = False

    def state(self) -> State:
        return self.job.status, self.job.pid, self.job.lease

    def output(self) -> list[Chunk]:
        """The output printed since the last round that wrote."""
        chunks = []
        for name in STREAMS:
            live = self.job.live(name)
            if live is not None and len(live) > self.sent[name]:
                start = self.sent[name]
                chunks.append((name, start, bytes(live[start:])))
        return chunks


@dataclass
class _Pending:
    """What a round wrote of one job, noted once the board took it."""

    publisher: _Publisher
    chunks: list[Chunk]
    #: The state its record was written with, if it was.
    record: State | None
    ended: bool

    def sent(self, now: float) -> None:
        publisher = self.publisher
        for name, start, data in self.chunks:
            publisher.sent[name] = start + len(data)
        if self.record is not None:
            publisher.written, publisher.written_at, publisher.behind = self.record, now, False
        elif self.chunks:
            publisher.behind = True


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
        #: Set when a change must be written now (a new job, a status, an end), not at
        #: the next tick; and held by the round that writes, so rounds never overlap.
        self._due = asyncio.Event()
        self._writing = asyncio.Lock()
        #: Set by a run thread on new output, cleared by the round that reads it: the
        #: first output after a round wakes the loop, the rest of it does nothing.
        self._printed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The reaper rests until then (monotonic): after the board failed or lost this
        #: instance's heartbeat, the others' heartbeats may be missing for the same
        #: reason, not because they died; each gets a full timeout to beat again.
        self._reap_after = 0.0

    @property
    def instance(self) -> str:
        return self.board.instance

    # -- serving --------------------------------------------------------------------

    async def serve(self, engine: Engine) -> None:
        """Start the heartbeat (with the reaper), the publishing rounds and the control
        inbox on this loop."""
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self.active = True
        with contextlib.suppress(StoreError):
            await self.board.heartbeat()
        self._tasks = [
            asyncio.ensure_future(self._forever(self._beat, HEARTBEAT_SECONDS)),
            asyncio.ensure_future(self._forever(self._publish, 0)),
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
                self._failed(error)
                await asyncio.sleep(max(pause, 0.5))
                continue
            if pause:
                await asyncio.sleep(pause)

    def _failed(self, error: StoreError) -> None:
        if self._failing is None:
            log.warning("job board failed: %s", error.message)
        self._failing = error.message
        self._rest_reaper()

    def _rest_reaper(self) -> None:
        self._reap_after = time.monotonic() + self.board.instance_timeout

    @property
    def board_name(self) -> str:
        return type(self.board).__name__

    async def _beat(self) -> None:
        if not await self.board.heartbeat():
            # The board lost this instance (a Redis restarted empty, or a silence long
            # enough to be reaped): write its running jobs again, and rest the reaper.
            self._rest_reaper()
            for publisher in self._publishers.values():
                publisher.written = None
            self._due.set()
        if time.monotonic() < self._reap_after:
            return
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
        with contextlib.suppress(asyncio.TimeoutError, StoreError):
            await asyncio.wait_for(self.publish_round(), END_WAIT_SECONDS)
        return ControlAnswer(done=done, status=job.status)

    # -- publishing -----------------------------------------------------------------

    def track(self, job: Job) -> None:
        """Publish ``job`` from now on, and each change of it."""
        if not self.active:
            return
        job.instance = self.instance
        self._publishers[job.job_id] = _Publisher(job)
        job.on_change = self._due.set
        job.on_output = self._output
        job.on_publish = self._published
        self._due.set()

    async def _published(self) -> None:
        """A round now (a board that fails is the next round's to write)."""
        with contextlib.suppress(StoreError):
            await self.publish_round()

    def _output(self) -> None:
        """On a run thread: new output. The first since the last round wakes the loop
        (a race between two threads costs one wake-up more, nothing else)."""
        if not self._printed and self._loop is not None:
            self._printed = True
            self._loop.call_soon_threadsafe(self._due.set)

    async def _publish(self) -> None:
        """A round once one is due (new output, a change), at most every ROUND_SECONDS;
        and when a record is behind its output, after RECORD_SECONDS at the latest."""
        behind = any(publisher.behind for publisher in self._publishers.values())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._due.wait(), RECORD_SECONDS if behind else None)
        started = time.monotonic()
        if self._printed:  # the rest of what is being printed (a line's end) comes along
            await asyncio.sleep(GATHER_SECONDS)
        self._due.clear()
        await self.publish_round()
        # The next round no sooner than ROUND_SECONDS after this one was due: a line
        # printed less often than that goes at once, not after a pause of its own.
        await asyncio.sleep(started + ROUND_SECONDS - time.monotonic())

    async def publish_round(self) -> None:
        """Write what is new of every local job in one board transaction: output, the
        records due, the ends. What a failed round had is written by the next."""
        async with self._writing:
            self._printed = False  # output from now on wakes the next round
            now = time.monotonic()
            batch = Round()
            pending = []
            for publisher in list(self._publishers.values()):
                job = publisher.job
                ended = job.ended  # read before the output: none is captured after the end
                chunks = publisher.output()
                if chunks:
                    batch.output.append((job.job_id, chunks))
                state = publisher.state()
                record = not ended and (
                    state != publisher.written
                    or (
                        (chunks or publisher.behind)
                        and now - publisher.written_at >= RECORD_SECONDS
                    )
                )
                if ended:
                    batch.ended.append(record_of(job, self.instance))
                elif record:
                    batch.records.append(record_of(job, self.instance))
                pending.append(_Pending(publisher, chunks, state if record else None, ended))
            if batch:
                await self.board.write(batch)
            for done in pending:
                done.sent(now)
                if done.ended:
                    self._publishers.pop(done.publisher.job.job_id, None)

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
