"""The jobs API: list jobs, read one, page or follow its output, cancel, pause, resume.

Every reader reads the job's shared captures at its own pace: nothing is
copied per reader while the command runs, so a slow reader slows neither the
command nor the other readers. While a job runs, pages come from its live
capture; once its run is over (``control.sealed``) the captures are emptied
into the stored result, and pages come from that result's text instead.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runcache import wire
from runcache.api import engine_of
from runcache.errors import BadRequest, Conflict
from runcache.jobs import LAST_OUTPUT_CHARS, Job
from runcache.responses import json_answer

#: Bytes a page holds unless the request asks for fewer (or more, up to MAX_PAGE_BYTES).
DEFAULT_PAGE_BYTES = 65536
MAX_PAGE_BYTES = 1 << 20

#: Most bytes of one stream an event carries.
EVENT_BYTES = 65536

#: How long a cancel waits for the run to end, so its answer can say ``cancelled``.
CANCEL_WAIT_SECONDS = 5.0

STREAMS = ("stdout", "stderr")

#: A UTF-8 character is at most this many bytes long.
_UTF8_MAX = 4

_LAST_LINE_WINDOW = 4096

#: The output of ended jobs, decoded once from their stored results (kept while the job is).
_stored_output: weakref.WeakKeyDictionary[Job, dict[str, bytes]] = weakref.WeakKeyDictionary()


# -- reading a stream ----------------------------------------------------------------


def _stored(job: Job) -> dict[str, bytes]:
    """An ended job's output as UTF-8, from its result body, decoded once per job."""
    found = _stored_output.get(job)
    if found is None:
        if job.body is None:  # it ended without running
            found = {name: b"" for name in STREAMS}
        else:
            result = msgspec.json.decode(job.body, type=wire.StoredResult)
            found = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
        _stored_output[job] = found
    return found


async def read_stream(job: Job, name: str, offset: int, limit: int) -> tuple[bytes, int, int, bool]:
    """Up to ``limit`` bytes of a stream from ``offset``, never splitting a UTF-8 character:
    the bytes, the offset after them, the stream's length so far, and whether it is final.

    While the job runs this reads its live capture. Once the run is over it
    reads the output decoded from the stored result: there, offsets count the
    UTF-8 of the stored text, the same as the raw bytes unless the command
    printed something that is not valid UTF-8 (stored as U+FFFD).
    """
    control = job.control
    if control is not None and not control.sealed and not job.ended:
        live = control.stdout.data if name == "stdout" else control.stderr.data
        total = len(live)
        start = min(offset, total)
        piece = bytes(live[start:start + limit + 2 * _UTF8_MAX])
        if not control.sealed:  # taken before the run's end emptied the capture
            return _whole_characters(piece, start, limit, total, final=False)
    while not job.ended:  # its result is being encoded: the end is near
        await job.changed()
    data = _stored(job)[name]
    total = len(data)
    start = min(offset, total)
    piece = data[start:start + limit + 2 * _UTF8_MAX]
    return _whole_characters(piece, start, limit, total, final=True)


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


# -- the routes ----------------------------------------------------------------------


def _job(request: Request) -> Job:
    return engine_of(request).jobs.get(request.path_params["job_id"])


def _summary(job: Job) -> wire.RunSummary | None:
    if job.body is None:
        return None
    return msgspec.json.decode(job.body, type=wire.RunSummary)


def _last_line(job: Job) -> str:
    if not job.ended:
        return job.last_output()
    for name in STREAMS:
        tail = _stored(job)[name][-_LAST_LINE_WINDOW:].decode("utf-8", "replace")
        lines = [line for line in tail.splitlines() if line.strip()]
        if lines:
            return lines[-1][:LAST_OUTPUT_CHARS]
    return ""


def _fields(job: Job) -> dict[str, object]:
    ended = job.ended
    sizes = ({name: len(data) for name, data in _stored(job).items()} if ended
             else {name: len(job.stream(name)) for name in STREAMS})
    summary = _summary(job) if ended else None
    fields: dict[str, object] = {
        "job_id": job.job_id,
        "command": job.command,
        "status": job.status,
        "pid": job.pid,
        "started_at": round(job.started_at, 6),
        "runtime": round(job.runtime, 6),
        "stdout_bytes": sizes["stdout"],
        "stderr_bytes": sizes["stderr"],
        "last_output": _last_line(job),
        "cache_key": job.cache_key,
        "background": job.background,
    }
    if summary is not None:
        fields["return_code"] = summary.return_code
    if job.error is not None:
        fields["error"] = job.error
    return fields


def record(job: Job) -> wire.JobRecord:
    """A job as ``GET /api/jobs`` lists it."""
    return wire.JobRecord(**_fields(job))  # type: ignore[arg-type]


def result_json(job: Job) -> bytes | None:
    """An ended job's result, as ``POST /api/command`` answered its first client."""
    if job.body is None:
        return None
    flags = b',"cached":%s,"coalesced":%s}' % (
        b"true" if job.cached else b"false", b"true" if job.elsewhere else b"false")
    return job.body[:-1] + flags


async def list_jobs(request: Request) -> Response:
    jobs = engine_of(request).jobs.listing()
    return json_answer(wire.JobList([record(job) for job in jobs]))


async def job_detail(request: Request) -> Response:
    job = _job(request)
    body = result_json(job)
    result = (msgspec.json.decode(body, type=wire.CommandResult) if body is not None
              else msgspec.UNSET)
    return json_answer(wire.JobDetail(**_fields(job), result=result))  # type: ignore[arg-type]


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _stream_param(request: Request) -> str:
    name = request.query_params.get("stream", "stdout")
    if name not in STREAMS:
        raise BadRequest("stream must be stdout or stderr")
    return name


async def job_output(request: Request) -> Response:
    job = _job(request)
    name = _stream_param(request)
    offset = _int_param(request, "offset", 0, 0, 1 << 62)
    limit = _int_param(request, "limit", DEFAULT_PAGE_BYTES, 1, MAX_PAGE_BYTES)
    data, next_offset, total, eof = await read_stream(job, name, offset, limit)
    return json_answer(wire.JobOutput(
        data=data.decode("utf-8", "replace"), offset=next_offset - len(data),
        next_offset=next_offset, total_bytes=total, eof=eof,
    ))


# -- following a job: Server-Sent Events ---------------------------------------------

_LINE_END = re.compile(r"\r\n|\r|\n")
_EVENT_ID = re.compile(r"^(\d+):(\d+)$")


def _event_id_param(request: Request) -> tuple[int, int]:
    """Where a reader resumes: the ``Last-Event-ID`` it sends, ``<stdout end>:<stderr end>``."""
    last = request.headers.get("last-event-id")
    if last is None or not last.strip():
        return 0, 0
    match = _EVENT_ID.match(last.strip())
    if match is None:
        raise BadRequest("Last-Event-ID must be <stdout offset>:<stderr offset>, "
                         "as the events of this job carry")
    return int(match[1]), int(match[2])


def _event(kind: str, data: str, event_id: str | None = None) -> bytes:
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in _LINE_END.split(data))
    return ("\n".join(lines) + "\n\n").encode()


async def _follow(job: Job, positions: dict[str, int]) -> AsyncIterator[bytes]:
    job.followers += 1  # so the run's thread wakes this loop on new output
    try:
        while True:
            ended = job.ended
            sent = False
            for name in STREAMS:
                data, next_offset, _, _ = await read_stream(job, name, positions[name],
                                                            EVENT_BYTES)
                if next_offset != positions[name]:
                    positions[name] = next_offset
                    sent = True
                    event_id = f"{positions['stdout']}:{positions['stderr']}"
                    yield _event(name, data.decode("utf-8", "replace"), event_id)
            if ended and not sent:
                break
            if not sent:
                await job.changed()
        body = result_json(job)
        if body is None:
            yield _event("error", wire.encode(wire.Error(job.error or "")).decode())
        else:
            yield _event("result", body.decode())
    finally:
        job.followers -= 1


async def job_events(request: Request) -> Response:
    """Server-Sent Events: ``stdout`` and ``stderr`` chunks as the command prints them,
    each with the id ``<stdout end>:<stderr end>`` (send it back as ``Last-Event-ID`` to
    resume exactly after it), then one ``result`` (or ``error``, for a job that never
    ran), then the end. A carriage return reads as a line end (SSE cannot carry one):
    page ``/output`` for the exact bytes."""
    job = _job(request)
    out, err = _event_id_param(request)
    return StreamingResponse(
        _follow(job, {"stdout": out, "stderr": err}),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- steering a job ------------------------------------------------------------------


def _action(job: Job) -> Response:
    return json_answer(wire.JobAction(job_id=job.job_id, status=job.status))  # type: ignore[arg-type]


async def cancel_job(request: Request) -> Response:
    job = _job(request)
    if not engine_of(request).cancel(job):
        raise Conflict(_cannot("cancelled", job))
    with_deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_SECONDS
    while not job.ended and asyncio.get_running_loop().time() < with_deadline:
        try:
            await asyncio.wait_for(job.changed(), with_deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            break
    return _action(job)


async def pause_job(request: Request) -> Response:
    job = _job(request)
    if not engine_of(request).pause(job):
        raise Conflict(_cannot("paused", job))
    return _action(job)


async def resume_job(request: Request) -> Response:
    job = _job(request)
    if not engine_of(request).resume(job):
        raise Conflict(_cannot("resumed", job))
    return _action(job)


def _cannot(done: str, job: Job) -> str:
    if job.ended:
        state = f"has ended ({job.status})"
    elif job.pid is None:
        state = "has not started yet (it waits for a free slot)"
    else:
        state = f"is {job.status}"
    return f"job {job.job_id} cannot be {done}: it {state}"


ROUTES = [
    Route("/api/jobs", list_jobs, methods=["GET"]),
    Route("/api/jobs/{job_id}", job_detail, methods=["GET"]),
    Route("/api/jobs/{job_id}/output", job_output, methods=["GET"]),
    Route("/api/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/api/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/jobs/{job_id}/pause", pause_job, methods=["POST"]),
    Route("/api/jobs/{job_id}/resume", resume_job, methods=["POST"]),
]
