"""What clients see of jobs and of the reference's processes, built from the engine's jobs.

The HTTP routes (:mod:`runcache.web.routes.jobs`, :mod:`runcache.web.routes.processes`) and the
MCP tools answer with the same shapes and the same errors, so both call these
functions: each takes the engine or a job and returns a :mod:`runcache.wire`
shape, or raises the :class:`~runcache.errors.RuncacheError` a client reads.
Nothing here knows of HTTP.

Every reader reads a job's shared captures at its own pace: nothing is copied
per reader while the command runs, so a slow reader slows neither the command
nor the other readers. While a job runs, pages come from its live capture; once
its run is over (``control.sealed``) the captures are emptied into the stored
result, and pages come from that result's text instead, decoded once per job (in
a thread when large) and kept on the job within ``--job-output-bytes``. A
listing reads none of it: it shows the facts the job worked out when it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import psutil

from runcache import wire
from runcache.engine.engine import Engine, Outcome
from runcache.engine.jobs import STREAMS as STREAMS
from runcache.engine.jobs import Job, decode_output
from runcache.engine.shared_jobs import RemoteJob
from runcache.errors import Conflict, NotFound

#: A page's bounds, declared with the query that asks for one (``wire.PageQuery``).
DEFAULT_PAGE_BYTES = wire.DEFAULT_PAGE_BYTES
MAX_PAGE_BYTES = wire.MAX_PAGE_BYTES
MAX_OFFSET = wire.MAX_OFFSET

#: Most bytes of one stream an event carries.
EVENT_BYTES = 65536

#: How long a cancel or terminate waits for the run to end, so its answer can say so.
END_WAIT_SECONDS = 5.0

#: A UTF-8 character is at most this many bytes long.
_UTF8_MAX = 4

#: A stored result larger than this is decoded in a thread, between the loop's other work.
DECODE_IN_THREAD_BYTES = 256 * 1024


# -- reading a stream ----------------------------------------------------------------


async def _stored(job: Job) -> dict[str, bytes]:
    """An ended job's output as UTF-8, from its result body, decoded once per job and
    kept on it; :class:`~runcache.errors.Gone` once dropped to keep within the budget."""
    async with job.output_lock:
        job.check_output()
        if job.output is not None:
            return job.output
        body = job.body
        if body is not None and len(body) > DECODE_IN_THREAD_BYTES:
            found = await asyncio.to_thread(decode_output, body)
        else:
            found = decode_output(body)
        job.keep_output(found)
        return found


async def read_stream(job: Job, name: str, offset: int, limit: int) -> tuple[bytes, int, int, bool]:
    """Up to ``limit`` bytes of a stream from ``offset``, never splitting a UTF-8 character:
    the bytes, the offset after them, the stream's length so far, and whether it is final.

    While the job runs this reads its live capture. Once the run is over it
    reads the output decoded from the stored result: there, offsets count the
    UTF-8 of the stored text, the same as the raw bytes unless the command
    printed something that is not valid UTF-8 (stored as U+FFFD).
    """
    await job.catch_up()
    live = job.live(name)
    if live is not None:
        total = len(live)
        start = min(offset, total)
        piece = bytes(live[start : start + limit + 2 * _UTF8_MAX])
        if job.live(name) is not None:  # taken before the run's end emptied the capture
            return _whole_characters(piece, start, limit, total, final=False)
    while not job.ended:  # its result is being encoded: the end is near
        await job.changed()
    return read_final((await _stored(job))[name], offset, limit)


def read_final(data: bytes, offset: int, limit: int) -> tuple[bytes, int, int, bool]:
    """:func:`read_stream` of a stream that is complete: ``data``, the whole of it."""
    total = len(data)
    start = min(offset, total)
    piece = data[start : start + limit + 2 * _UTF8_MAX]
    return _whole_characters(piece, start, limit, total, final=True)


def may_have_more(job: Job, name: str, offset: int) -> bool:
    """Whether a stream may hold bytes past ``offset``: cheap, so a reader skips a stream
    that has not grown. Only a live capture can say no; an ended job's output is read."""
    live = job.live(name)
    return live is None or len(live) > offset


def _whole_characters(
    piece: bytes, start: int, limit: int, total: int, final: bool
) -> tuple[bytes, int, int, bool]:
    """Cut ``piece`` (the stream's bytes from ``start``) to at most ``limit`` bytes of whole
    characters. A start inside a character moves on to the next one, an end inside one
    moves back before it, and while the stream may grow, a last character not complete
    yet waits for the next read. A limit shorter than one character still returns that
    character, so a reader always moves on."""
    skip = 0
    while skip < min(len(piece), _UTF8_MAX - 1) and _continuation(piece[skip]):
        skip += 1
    body = piece[skip:]
    end = min(limit, len(body))
    if end < len(body):
        end = _back_to_lead(body, end)
    elif not final:
        end = _before_incomplete_tail(body, end)
    if end == 0 and body:
        whole = _character_length(body[0])
        if whole <= len(body):
            end = whole
    next_offset = start + skip + end
    return body[:end], next_offset, total, final and next_offset >= total


def _continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _character_length(lead: int) -> int:
    if lead >= 0xF0:
        return 4
    if lead >= 0xE0:
        return 3
    return 2 if lead >= 0xC0 else 1


def _back_to_lead(data: bytes, end: int) -> int:
    """``end``, or the start of the character it falls inside (if the bytes are UTF-8)."""
    back = end
    while back > 0 and end - back < _UTF8_MAX - 1 and _continuation(data[back]):
        back -= 1
    return end if _continuation(data[back]) else back


def _before_incomplete_tail(data: bytes, end: int) -> int:
    """``end``, or the start of a last character whose last bytes have not come yet."""
    for lead in range(end - 1, max(-1, end - _UTF8_MAX), -1):
        if not _continuation(data[lead]):
            return lead if lead + _character_length(data[lead]) > end else end
    return end


# -- jobs ----------------------------------------------------------------------------

#: How long the answer to a background request waits for the command's pid.
PID_WAIT_SECONDS = 0.5


async def accepted(job: Job) -> wire.JobAccepted:
    """The answer to a background request, with the pid once the command has started
    (at most ``PID_WAIT_SECONDS`` later; null while it waits for a slot, or cached), and
    the job on the job board with it."""
    deadline = asyncio.get_running_loop().time() + PID_WAIT_SECONDS
    # A job another process runs (a pool's) has no run here to wait for.
    loop = asyncio.get_running_loop()
    while job.control is not None and job.pid is None and not job.ended and loop.time() < deadline:
        await asyncio.sleep(0.002)
    await job.published()  # the next request may reach another instance
    return wire.JobAccepted(job.job_id, job.status, job.cache_key, job.pid)  # type: ignore[arg-type]


def _fields(job: Job) -> dict[str, object]:
    """A job's record; an ended one's from the facts it worked out as it ended, so that
    listing many jobs with large outputs decodes none of them."""
    facts = job.listing_facts()
    sizes = {"stdout": facts.stdout_bytes, "stderr": facts.stderr_bytes}
    last_output, return_code = facts.last_output, facts.return_code if job.ended else None
    fields: dict[str, object] = {
        "job_id": job.job_id,
        "command": job.command,
        "status": job.status,
        "pid": job.pid,
        "started_at": round(job.started_at, 6),
        "runtime": round(job.runtime, 6),
        "stdout_bytes": sizes["stdout"],
        "stderr_bytes": sizes["stderr"],
        "last_output": last_output,
        "cache_key": job.cache_key,
        "background": job.background,
        "cached": job.cached,
    }
    if return_code is not None:
        fields["return_code"] = return_code
    if job.error is not None:
        fields["error"] = job.error
    if job.instance is not None:
        fields["instance"] = job.instance
    return fields


def record(job: Job) -> wire.JobRecord:
    """A job as ``GET /api/jobs`` lists it."""
    return wire.JobRecord(**_fields(job))  # type: ignore[arg-type]


def result_json(job: Job) -> bytes | None:
    """An ended job's result, as ``POST /api/command`` answered its first client."""
    if job.body is None:
        return None
    return Outcome(job.body, cached=job.cached, coalesced=job.elsewhere, stale=job.stale).to_json()


def detail(job: Job) -> wire.JobDetail:
    """A job as ``GET /api/jobs/{job_id}`` answers: its record, and its result once ended."""
    body = result_json(job)
    result = (
        msgspec.json.decode(body, type=wire.CommandResult) if body is not None else msgspec.UNSET
    )
    return wire.JobDetail(**_fields(job), result=result)  # type: ignore[arg-type]


async def page(job: Job, stream: str, offset: int, limit: int) -> wire.JobOutput:
    """A page of one of a job's streams: ``GET /api/jobs/{job_id}/output``."""
    return as_page(*await read_stream(job, stream, offset, limit))


def as_page(data: bytes, next_offset: int, total: int, eof: bool) -> wire.JobOutput:
    """What :func:`read_stream` or :func:`read_final` read, as the answer of a page."""
    return wire.JobOutput(
        data=data.decode("utf-8", "replace"),
        offset=next_offset - len(data),
        next_offset=next_offset,
        total_bytes=total,
        eof=eof,
    )


async def until_ended(job: Job, seconds: float = END_WAIT_SECONDS) -> None:
    """Wait for ``job`` to end, ``seconds`` at most."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_end_of(job), seconds)


async def _end_of(job: Job) -> None:
    while not job.ended:
        await job.changed()


def _action(job: Job) -> wire.JobAction:
    return wire.JobAction(job_id=job.job_id, status=job.status)  # type: ignore[arg-type]


async def _steer(engine: Engine, job: Job, verb: str) -> bool:
    """Do ``verb`` to ``job`` here, or (another instance's job) ask the instance that runs
    it, through the job board; whether it was done."""
    if isinstance(job, RemoteJob):
        if engine.queued(job):  # no worker has it: nothing runs to pause or resume
            # Left by its one background owner, nobody wants it: cancelled, as a run is.
            alone = job.record.background and len(job.record.owners) <= 1
            if (verb == "cancel" or (verb == "leave" and alone)) and await engine.cancel_queued(
                job
            ):
                return True
            if engine.queued(job):  # still (cancel_queued read it again): a worker has not
                return False
        sharing = engine.sharing
        assert sharing is not None
        return (await sharing.control(job, verb)).done
    act: Callable[[Job], bool] = getattr(engine, verb)
    done = act(job)
    if done and verb in ("pause", "resume"):
        await job.published()  # the next request may reach another instance
    return done


async def cancel(engine: Engine, job: Job) -> wire.JobAction:
    """Kill a job's whole group, and answer once it has ended (or after END_WAIT_SECONDS)."""
    if not await _steer(engine, job, "cancel"):
        raise Conflict(_cannot("cancelled", job))
    await until_ended(job)
    await job.published()  # its end, before the next request reaches another instance
    return _action(job)


async def leave(engine: Engine, job: Job) -> wire.JobAction:
    """A background request gives the job up; the run is cancelled if nobody else wants it."""
    if await _steer(engine, job, "leave"):
        await until_ended(job)
    return _action(job)


async def pause(engine: Engine, job: Job) -> wire.JobAction:
    if not await _steer(engine, job, "pause"):
        raise Conflict(_cannot("paused", job))
    return _action(job)


async def resume(engine: Engine, job: Job) -> wire.JobAction:
    if not await _steer(engine, job, "resume"):
        raise Conflict(_cannot("resumed", job))
    return _action(job)


def _cannot(done: str, job: Job) -> str:
    if job.ended:
        state = f"has ended ({job.status})"
    elif isinstance(job, RemoteJob) and job.record.pool is not None and job.pid is None:
        state = f"waits in the queue of pool {job.record.pool!r} for a worker"
    elif job.pid is None:
        state = "has not started yet (it waits for a free slot)"
    else:
        state = f"is {job.status}"
    return f"job {job.job_id} cannot be {done}: it {state}"


# -- the reference's processes (spec/processes.md) -----------------------------------
#
# A run's pid is the pid of its process group's leader; one still waiting for a
# slot has none yet and is not listed. A shell command tells nobody how far
# along it is, so progress is always 0.0 and the eta unknown.

#: The dashboard's cuts, as the reference makes them.
DASHBOARD_COMMAND_CHARS = 60
DASHBOARD_OUTPUT_CHARS = 100
PROGRESS_BAR_WIDTH = 20

_PID = re.compile(r"^[0-9]{1,10}$")


class ProcessNotFound(NotFound):
    """A process route's 404: its body is the reference's, with ``"success": false``."""

    def answer(self) -> msgspec.Struct:
        return wire.ProcessFailure(error=self.message)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


#: A job's status as the reference's four: a cancelled run was terminated, any other
#: end (failed and timed out too) completed.
_STATUS: dict[str, wire.ProcessStatus] = {
    "running": "running",
    "paused": "paused",
    "cancelled": "terminated",
}


def _status(job: Job) -> wire.ProcessStatus:
    return _STATUS.get(job.status, "completed")


def _process(job: Job, pid: int) -> wire.Process:
    job_record = record(job)
    return wire.Process(
        instance=job.instance if job.instance is not None else msgspec.UNSET,
        pid=pid,
        command=job.command,
        status=_status(job),
        start_time=job_record.started_at,
        progress=0.0,
        last_output=job_record.last_output,
        bytes_processed=job_record.stdout_bytes + job_record.stderr_bytes,
        runtime_formatted=_seconds(job_record.runtime),
        eta_formatted="Unknown",
    )


def _dashboard_entry(job: Job, pid: int) -> wire.DashboardEntry:
    job_record = record(job)
    command = job.command
    if len(command) > DASHBOARD_COMMAND_CHARS:
        command = command[:DASHBOARD_COMMAND_CHARS] + "..."
    return wire.DashboardEntry(
        pid=pid,
        command=command,
        status=_status(job),
        runtime=_seconds(job_record.runtime),
        progress_percent="0.0%",
        progress_bar="░" * PROGRESS_BAR_WIDTH,
        eta="Calculating...",
        bytes_processed=job_record.stdout_bytes + job_record.stderr_bytes,
        last_output=job_record.last_output[:DASHBOARD_OUTPUT_CHARS],
    )


async def _active(engine: Engine, viewer: str | None = None) -> list[tuple[int, Job]]:
    """Running and paused runs that have a process, oldest first, as the reference lists them
    (those ``viewer`` may see: :meth:`Job.visible_to <runcache.engine.jobs.Job.visible_to>`),
    on every instance sharing the store."""
    jobs = await engine.job_listing(viewer)
    return [(job.pid, job) for job in reversed(jobs) if job.pid is not None and not job.ended]


async def _running(engine: Engine, pid: int, viewer: str | None) -> Job | None:
    """The live run whose group leader is ``pid``. A pid is unique on one machine only:
    when live runs of several instances have it, the answer is a 409 naming their jobs."""
    if engine.sharing is None:
        return engine.jobs.by_pid(pid, viewer)
    found = [job for found_pid, job in await _active(engine, viewer) if found_pid == pid]
    if len(found) > 1:
        ids = ", ".join(job.job_id for job in found)
        raise Conflict(
            f"pid {pid} names live runs on several instances (jobs {ids}): "
            "use the job routes, /api/jobs/{job_id}, with one of those ids"
        )
    return found[0] if found else None


async def _find(engine: Engine, pid: int, viewer: str | None = None) -> Job | None:
    """The run whose group leader is ``pid``: the one running, else the last one that ended
    (kept for ``--job-retention``), so a status read just after the end still answers;
    either only if ``viewer`` may see it."""
    running = await _running(engine, pid, viewer)
    if running is not None:
        return running
    return next((job for job in await engine.job_listing(viewer) if job.pid == pid), None)


def _pid(text: str, failure: str) -> int:
    """The pid a path names; text that is no pid names no run, and answers the 404."""
    if not _PID.match(text):
        raise ProcessNotFound(failure.format(pid=text))
    return int(text)


async def process_list(engine: Engine, viewer: str | None = None) -> wire.ProcessList:
    active = await _active(engine, viewer)
    return wire.ProcessList(
        active_processes={str(pid): _process(job, pid) for pid, job in active},
        total_count=len(active),
    )


async def process_status(
    engine: Engine, pid_text: str, viewer: str | None = None
) -> wire.ProcessDetail:
    failure = "Process {pid} not found"
    pid = _pid(pid_text, failure)
    job = await _find(engine, pid, viewer)
    if job is None:
        raise ProcessNotFound(failure.format(pid=pid))
    return wire.ProcessDetail(process=_process(job, pid))


#: What each steering verb does to a run, and how its answer says it was done.
_STEERING: dict[str, tuple[str, str]] = {
    "terminate": ("cancel", "terminated"),
    "pause": ("pause", "paused"),
    "resume": ("resume", "resumed"),
}


async def steer_process(
    engine: Engine, pid_text: str, verb: str, viewer: str | None = None
) -> wire.ProcessDone:
    """``terminate``, ``pause`` or ``resume`` the run whose group leader is the pid
    (if ``viewer`` may see it: another's answers as a pid that names no run).

    A terminate is a cancel (not cached, its waiters get the cancelled result)
    and answers once the run has ended, or after ``END_WAIT_SECONDS``.
    """
    act, done = _STEERING[verb]
    failure = f"Failed to {verb} process {{pid}} or process not found"
    pid = _pid(pid_text, failure)
    job = await _running(engine, pid, viewer)
    if job is None or not await _steer(engine, job, act):
        raise ProcessNotFound(failure.format(pid=pid))
    if verb == "terminate":
        await until_ended(job)
    return wire.ProcessDone(message=f"Process {pid} {done} successfully")


def _system_load() -> wire.SystemLoad:
    """The machine's load, read at once: ``cpu_percent`` compares with the previous call
    (the telemetry primes it) instead of sampling for a second as the reference does."""
    connections = psutil.Process().net_connections(kind="tcp")
    return wire.SystemLoad(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        active_connections=sum(
            1 for connection in connections if connection.status == psutil.CONN_ESTABLISHED
        ),
    )


async def dashboard(engine: Engine, viewer: str | None = None) -> wire.Dashboard:
    active = await _active(engine, viewer)
    load = await asyncio.to_thread(_system_load)  # reads /proc: off the event loop
    return wire.Dashboard(
        timestamp=_now(),
        total_processes=len(active),
        processes=[_dashboard_entry(job, pid) for pid, job in active],
        system_load=load,
    )


def task_submitted(job: Job) -> wire.TaskSubmitted:
    """The answer of ``POST /api/process/execute-async``: the task id is the job's id."""
    return wire.TaskSubmitted(task_id=job.job_id, command=job.command, timestamp=_now())


async def task_result(engine: Engine, task_id: str, viewer: str | None = None) -> wire.TaskResult:
    try:
        job = await engine.job(task_id, viewer)
    except NotFound:
        raise NotFound("Task not found") from None
    body = result_json(job)
    result = None if body is None else msgspec.json.decode(body, type=wire.CommandResult)
    status: wire.TaskStatus = (
        "running" if not job.ended else "completed" if job.status == "completed" else "failed"
    )
    return wire.TaskResult(
        task_id=job.job_id,
        result=wire.TaskState(status=status, result=result, execution_time=round(job.runtime, 6)),
        timestamp=_now(),
    )
