"""Jobs: every run, as something clients can follow, page, pause, resume and cancel.

A job is made for each command that runs (a foreground request, a background
one, or one that many identical requests share) and for each background
request answered from the cache. It lives in the server process that runs it:
listed while it runs, then kept for ``retention`` seconds, at most
``MAX_FINISHED`` of them, oldest dropped first. Its id is random and URL-safe,
so a job cannot be guessed from another.

A finished job keeps its output (the stored result's JSON, and the text decoded
from it once a reader pages it) within a byte budget shared by every job of the
process (``--job-output-bytes``): past it, the output of the jobs that ended or
were read longest ago is dropped, and what a listing shows of it (sizes, last
line, exit code, :class:`OutputFacts`) stays, worked out once when the job ended
so that a listing never decodes a result.

Clients of a job are the requests waiting for its answer. When the last one
goes away, a job nobody else can use (not cached, not in the background) is
cancelled; one that will be cached runs on, and later requests may still join it.
Background requests hold a job until they leave it: one that its last holder
leaves, with no client waiting, is cancelled whether or not it would be cached.

Owners. With tokens set, a job belongs to the identities (:mod:`runcache.web.auth`)
of the requests that started or joined it, and only they (and the admin token)
see it: a lookup on behalf of a ``viewer`` that is not an owner answers as if
the job did not exist. A viewer of None sees every job: the admin token, and
every request to a server without tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from runcache.errors import Gone, NotFound
from runcache.run.runner import RunControl, RunResult

#: Finished jobs kept at the most; past it the oldest are dropped.
MAX_FINISHED = 1000

#: How much of a stream's end is read to find its last line.
_LAST_LINE_WINDOW = 4096

#: The longest ``last_output`` a listing shows.
LAST_OUTPUT_CHARS = 200

#: Bytes of finished jobs' output kept unless ``--job-output-bytes`` says.
DEFAULT_OUTPUT_BYTES = 128 * 1024 * 1024

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class OutputFacts:
    """What a listing shows of an ended job's output, worked out once when it ends: the
    UTF-8 size of each stream's stored text, its last line and the exit code."""

    stdout_bytes: int = 0
    stderr_bytes: int = 0
    last_output: str = ""
    return_code: int | None = None


def last_line(*tails: str) -> str:
    """The last non-empty line of the first of ``tails`` that has one, shortened."""
    for tail in tails:
        lines = [line for line in tail.splitlines() if line.strip()]
        if lines:
            return lines[-1][:LAST_OUTPUT_CHARS]
    return ""


class _Stored(msgspec.Struct):
    """The parts of a stored result (a :class:`~runcache.wire.StoredResult`) jobs read."""

    stdout: str = ""
    stderr: str = ""
    return_code: int | None = None


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def output_facts(body: bytes | None) -> OutputFacts:
    """The facts of a stored result's JSON (none for a job that ended without one). It
    decodes the whole body: called where that may take a while (a run's thread)."""
    if body is None:
        return OutputFacts()
    result = msgspec.json.decode(body, type=_Stored)
    return OutputFacts(
        stdout_bytes=_utf8_size(result.stdout),
        stderr_bytes=_utf8_size(result.stderr),
        last_output=last_line(
            result.stdout[-_LAST_LINE_WINDOW:], result.stderr[-_LAST_LINE_WINDOW:]
        ),
        return_code=result.return_code,
    )


def decode_output(body: bytes | None) -> dict[str, bytes]:
    """A stored result's output as UTF-8, each stream as pages read it."""
    if body is None:  # it ended without running
        return {name: b"" for name in STREAMS}
    result = msgspec.json.decode(body, type=_Stored)
    return {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}


class Job:
    """One run (or one cached answer to a background request) and who waits for it."""

    def __init__(
        self,
        job_id: str,
        command: str,
        cache_key: str,
        control: RunControl | None,
        cacheable: bool,
        background: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.command = command
        self.cache_key = cache_key
        self.control = control
        self.cacheable = cacheable
        #: Background requests that started or joined this job and have not left it.
        self.holders = 1 if background else 0
        self.started_at = time.time()
        self._clock = clock
        self._started = clock()
        self._ended: float | None = None
        #: The stored result's JSON, once the job has ended.
        self.body: bytes | None = None
        #: Whether the result came from the cache (a background hit) or another instance.
        self.cached = False
        #: A cached answer past its expiry (``"stale": S``), being refreshed meanwhile.
        self.stale = False
        self.elsewhere = False
        self.summary: RunResult | None = None
        #: Why the job ended without running, when it did (every slot stayed busy, say).
        self.error: str | None = None
        self.task: asyncio.Future[bytes] | None = None
        self.clients = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self.followers = 0
        #: What a listing shows of the output once the job has ended.
        self.facts: OutputFacts | None = None
        #: The ended job's output decoded from ``body`` for pages, once one is read.
        self.output: dict[str, bytes] | None = None
        #: Held while ``output`` is decoded, so concurrent readers decode it once.
        self.output_lock = asyncio.Lock()
        #: Set when its output was dropped to keep finished jobs' output in its budget.
        self.dropped_message: str | None = None
        #: Told when the output this job keeps changes size (its :class:`Jobs`).
        self.on_kept: Callable[[Job], None] | None = None
        #: The identities of the requests that started or joined it (empty without tokens).
        self.owners: set[str] = set()
        #: The instance running it, with a shared store (:mod:`runcache.stores.board`).
        self.instance: str | None = None
        #: Told on the loop when the job's state changes (a pause, a resume, a lease, its
        #: end), not on each output: what publishes it to the job board
        #: (:mod:`runcache.engine.shared_jobs`), which reads new output on its own tick.
        self.on_change: Callable[[], None] | None = None
        #: The token of the store's single-flight lock its run holds, once taken.
        self.lease: str | None = None
        #: Told on the run's thread of new output, with a shared store: it only notes it
        #: (and wakes the loop once a round), never works there.
        self.on_output: Callable[[], None] | None = None
        #: The pool whose worker runs it (set on a worker: :mod:`runcache.engine.worker`).
        self.pool: str | None = None
        #: Writes the job as it is now to the job board, with a shared store.
        self.on_publish: Callable[[], Awaitable[None]] | None = None

    # -- state --------------------------------------------------------------------

    @property
    def background(self) -> bool:
        """Whether a background request still holds the job (it runs on without clients)."""
        return self.holders > 0

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def status(self) -> str:
        """running, paused, completed, failed, timed_out or cancelled."""
        result = self.summary
        if self._ended is None:
            return "paused" if self.control is not None and self.control.paused else "running"
        if self.error is not None:
            return "failed"
        if result is None:
            return "completed"  # answered from the cache, or by another instance's run
        if result.cancelled:
            return "cancelled"
        if result.timed_out:
            return "timed_out"
        return "completed" if result.return_code == 0 else "failed"

    @property
    def pid(self) -> int | None:
        return self.control.pid if self.control is not None else None

    @property
    def runtime(self) -> float:
        end = self._ended if self._ended is not None else self._clock()
        return end - self._started

    def stream(self, name: str) -> bytearray:
        """The bytes captured so far from ``stdout`` or ``stderr``."""
        if self.control is None:
            return bytearray()
        return self.control.stdout.data if name == "stdout" else self.control.stderr.data

    def live(self, name: str) -> bytearray | None:
        """The live capture of a stream while the run goes; None once its output is to be
        read from the result (the run is over, or it never ran here)."""
        control = self.control
        if control is None or control.sealed or self.ended:
            return None
        return control.stdout.data if name == "stdout" else control.stderr.data

    def listing_facts(self) -> OutputFacts:
        """What a listing shows of the output: the facts worked out at the end, or the
        live captures' sizes and last line."""
        if self.ended and self.facts is not None:
            return self.facts
        return OutputFacts(
            len(self.stream("stdout")), len(self.stream("stderr")), self.last_output()
        )

    async def catch_up(self) -> None:
        """Take what is new of the job before a read: nothing to do for a local one."""

    async def ended_within(self, seconds: float) -> None:
        """Wait for the job to end, ``seconds`` at most."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._end(), seconds)

    async def _end(self) -> None:
        while not self.ended:
            await self.changed()

    async def published(self) -> None:
        """Return once the job as it is now is on the job board (at once without one), so
        that another instance asked next answers about it."""
        if self.on_publish is not None:
            await self.on_publish()

    def touch(self) -> None:
        """The job changed in a way its readers do not wait on (paused, resumed)."""
        if self.on_change is not None:
            self.on_change()

    def last_output(self) -> str:
        """The last non-empty line the command printed, on either stream, shortened."""
        for name in ("stdout", "stderr"):
            data = self.stream(name)
            tail = bytes(data[-_LAST_LINE_WINDOW:]).decode("utf-8", "replace")
            lines = [line for line in tail.splitlines() if line.strip()]
            if lines:
                return lines[-1][:LAST_OUTPUT_CHARS]
        return ""

    # -- waiting for it -------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """The callback the run's thread calls on new output: wakes followers on ``loop``."""
        self._loop = loop
        pending = False

        def landed() -> None:
            nonlocal pending
            pending = False
            self._wake_readers()

        def on_output() -> None:
            nonlocal pending
            if self.on_output is not None:
                self.on_output()
            if self.followers and not pending:
                pending = True
                loop.call_soon_threadsafe(landed)

        return on_output

    def finish(
        self,
        body: bytes,
        summary: RunResult | None,
        elsewhere: bool = False,
        facts: OutputFacts | None = None,
    ) -> None:
        """The job ended with the result ``body``; ``facts`` are worked out from it unless
        given (the engine gives them, having worked them out off the event loop)."""
        self.body = body
        self.summary = summary
        self.elsewhere = elsewhere
        self.facts = facts if facts is not None else output_facts(body)
        self._ended = self._clock()
        self._kept()
        self._wake()

    def fail(self, message: str) -> None:
        """The job ended without a result: ``message`` says why."""
        self.error = message
        self.facts = OutputFacts()
        self._ended = self._clock()
        self._wake()

    # -- the output it keeps ----------------------------------------------------------

    @property
    def kept_bytes(self) -> int:
        """Bytes of output this ended job holds: its result's JSON and its decoded text."""
        decoded = sum(map(len, self.output.values())) if self.output is not None else 0
        return len(self.body or b"") + decoded

    def keep_output(self, output: dict[str, bytes]) -> None:
        """Keep the output decoded for pages (unless it was dropped meanwhile)."""
        if self.dropped_message is None:
            self.output = output
            self._kept()

    def drop_output(self, message: str) -> None:
        """Let go of the output; reading it now answers ``message`` (410 Gone)."""
        self.body = None
        self.output = None
        self.dropped_message = message
        self._let_go_of_task()

    def _let_go_of_task(self) -> None:
        """Forget the run's task once done: its result is the body, which it would keep."""
        if self.dropped_message is not None and self.task is not None and self.task.done():
            self.task = None

    def check_output(self) -> None:
        """Raise :class:`Gone` if this job's output was dropped."""
        if self.dropped_message is not None:
            raise Gone(self.dropped_message)

    def _kept(self) -> None:
        if self.on_kept is not None:
            self.on_kept(self)

    def _wake(self) -> None:
        self._wake_readers()
        if self.on_change is not None:
            self.on_change()

    def _wake_readers(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def hold(self, token: str) -> None:
        """Its run took the store's lock for its key with ``token``."""
        self.lease = token
        self.touch()

    async def changed(self) -> None:
        """Return when the job has new output or has ended."""
        if self.ended:
            return
        await self._changed.wait()

    def ended_before(self, moment: float) -> bool:
        return self._ended is not None and self._ended < moment

    def visible_to(self, viewer: str | None) -> bool:
        """Whether ``viewer`` may see and steer the job: one of its owners, or None (all)."""
        return viewer is None or viewer in self.owners

    def own(self, owner: str | None) -> None:
        """A request of ``owner`` started or joined the job: it may see it from now on."""
        if owner is not None:
            self.owners.add(owner)


class Jobs:
    """The jobs of this server process, running and recently finished."""

    def __init__(
        self,
        retention: float,
        clock: Callable[[], float] = time.monotonic,
        output_bytes: int = DEFAULT_OUTPUT_BYTES,
    ) -> None:
        self.retention = retention
        #: Most bytes of output finished jobs keep, all together (``--job-output-bytes``).
        self.output_bytes = output_bytes
        self._clock = clock
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running_by_key: dict[str, Job] = {}
        #: Ended jobs that keep output, and the bytes counted for each: the one
        #: that ended or was read longest ago first.
        self._kept: OrderedDict[str, int] = OrderedDict()
        self._kept_total = 0
        #: The pool this process works for (a worker), named on each of its jobs.
        self.pool: str | None = None
        #: Told of each new job, with a shared store: it publishes them to the job board.
        self.on_new: Callable[[Job], None] | None = None

    def new(
        self,
        command: str,
        cache_key: str,
        control: RunControl | None,
        cacheable: bool,
        background: bool,
        owner: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """A job, listed from now on; a cacheable running one is found by its key. A
        worker gives the ``job_id`` the server that queued the command chose."""
        self.prune()
        # Hex, not token_urlsafe: one id in 64 of those began with "-", which a
        # command line (`runcache jobs logs -x…`) takes for an option.
        job = Job(
            job_id or secrets.token_hex(16),
            command,
            cache_key,
            control,
            cacheable,
            background,
            self._clock,
        )
        job.pool = self.pool
        job.on_kept = self._account
        job.own(owner)
        self._jobs[job.job_id] = job
        if cacheable and control is not None:
            self._running_by_key[cache_key] = job
        if self.on_new is not None:
            self.on_new(job)
        return job

    def running_for(self, cache_key: str) -> Job | None:
        """The cacheable job running now for ``cache_key``, which an identical request joins."""
        return self._running_by_key.get(cache_key)

    def ended(self, job: Job) -> None:
        job._let_go_of_task()  # dropped as it finished: its done task still held the body
        if self._running_by_key.get(job.cache_key) is job:
            del self._running_by_key[job.cache_key]

    def get(self, job_id: str, viewer: str | None = None) -> Job:
        """The job ``job_id``, if ``viewer`` may see it; the same 404 whether it does not
        exist or is another's, so a job's id tells nobody else it exists."""
        job = self._jobs.get(job_id)
        if job is None or not job.visible_to(viewer):
            raise self.not_found(job_id)
        return job

    def not_found(self, job_id: str) -> NotFound:
        """The 404 of a job id that names no job ``viewer`` may see."""
        if self.on_new is not None:  # a shared store: every instance's jobs were asked
            return NotFound(
                f"no job {job_id!r} on any server sharing this store: jobs are kept "
                f"{self.retention:g} s after they end"
            )
        return NotFound(
            f"no job {job_id!r} on this server: jobs live in the server process that runs "
            f"them and are kept {self.retention:g} s after they end"
        )

    def local(self, job_id: str) -> Job | None:
        """This process's job ``job_id``, whoever may see it."""
        return self._jobs.get(job_id)

    def by_pid(self, pid: int, viewer: str | None = None) -> Job | None:
        """The running (or paused) job whose process group leader is ``pid``, if
        ``viewer`` may see it."""
        for job in reversed(self._jobs.values()):
            if job.pid == pid and not job.ended:
                return job if job.visible_to(viewer) else None
        return None

    def listing(self, viewer: str | None = None) -> list[Job]:
        """Running jobs and recent ones that ``viewer`` may see, newest first."""
        self.prune()
        return [job for job in reversed(self._jobs.values()) if job.visible_to(viewer)]

    def running(self, viewer: str | None = None) -> list[Job]:
        return [job for job in self.listing(viewer) if not job.ended]

    def prune(self) -> None:
        """Drop finished jobs past their retention, and the oldest past MAX_FINISHED."""
        horizon = self._clock() - self.retention
        finished = [job for job in self._jobs.values() if job.ended]
        excess = len(finished) - MAX_FINISHED
        for job in finished:
            if excess > 0 or job.ended_before(horizon):
                del self._jobs[job.job_id]
                self._kept_total -= self._kept.pop(job.job_id, 0)
                excess -= 1

    @property
    def kept_bytes(self) -> int:
        """Bytes of output the finished jobs keep now, all together."""
        return self._kept_total

    def _account(self, job: Job) -> None:
        """Count what ``job`` keeps now (it ended, or its output was decoded), then drop
        the output of the jobs that ended or were read longest ago while over budget."""
        if job.job_id not in self._jobs:
            return  # pruned already
        self._kept_total += job.kept_bytes - self._kept.pop(job.job_id, 0)
        self._kept[job.job_id] = job.kept_bytes
        while self._kept_total > self.output_bytes and self._kept:
            job_id, size = self._kept.popitem(last=False)
            self._kept_total -= size
            self._jobs[job_id].drop_output(
                f"the output of job {job_id} was dropped to keep finished jobs' output under "
                f"--job-output-bytes ({self.output_bytes} bytes); its status stays listed"
            )
