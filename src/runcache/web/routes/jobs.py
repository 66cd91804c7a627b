"""The jobs API: list jobs, read one, page or follow its output, cancel, pause, resume.

The answers are built by :mod:`runcache.engine.job_answers`, which the MCP tools share;
this module reads the request's parameters and streams the events.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import Response

from runcache import wire
from runcache.engine import job_answers
from runcache.engine.callers import viewer_of
from runcache.engine.job_answers import EVENT_BYTES, STREAMS, read_stream, result_json
from runcache.engine.jobs import Job
from runcache.errors import BadRequest, Gone, StoreError
from runcache.web.operations import Answer, Operation
from runcache.web.responses import json_answer
from runcache.web.routes.commands import engine_of
from runcache.web.streams import EventStreamResponse


async def _job(request: Request) -> Job:
    """The job the path names, if the request's token may see it (404 otherwise): this
    server's, or with a shared store any server's."""
    return await engine_of(request).job(request.path_params["job_id"], viewer_of(request.scope))


async def list_jobs(request: Request) -> Response:
    jobs = await engine_of(request).job_listing(viewer_of(request.scope))
    return json_answer(wire.JobList([job_answers.record(job) for job in jobs]))


async def job_detail(request: Request) -> Response:
    return json_answer(job_answers.detail(await _job(request)))


async def job_output(request: Request) -> Response:
    job = await _job(request)
    query = wire.decode_query(wire.PageQuery, request.query_params)
    return json_answer(await job_answers.page(job, query.stream, query.offset, query.limit))


# -- following a job: Server-Sent Events ---------------------------------------------


def _event_id_param(request: Request) -> tuple[int, int]:
    """Where a reader resumes: the ``Last-Event-ID`` it sends, ``<stdout end>:<stderr end>``."""
    last = request.headers.get("last-event-id")
    if last is None or not last.strip():
        return 0, 0
    out, _, err = last.strip().partition(":")
    positions = wire.whole_number(out), wire.whole_number(err)
    if positions[0] is None or positions[1] is None:
        raise BadRequest(
            "Last-Event-ID must be <stdout offset>:<stderr offset>, as the events of this job carry"
        )
    return positions[0], positions[1]


def _event(kind: str, data: bytes, event_id: str | None = None) -> bytes:
    """One event carrying ``data`` (UTF-8; anything else reads as U+FFFD), a line each.

    Written with bytes.replace, not by splitting into lines: an event of short
    lines cost 4 ms that way, and a loop serving a hundred streams felt each.
    """
    text = data.decode("utf-8", "replace").encode()
    lines = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    head = f"event: {kind}\n" if event_id is None else f"event: {kind}\nid: {event_id}\n"
    return b"%sdata: %s\n\n" % (head.encode(), lines)


async def _follow(job: Job, positions: dict[str, int]) -> AsyncGenerator[bytes, None]:
    """The events of a job for one reader, from ``positions`` on.

    What each wake-up finds on both streams goes out in one write, and a stream
    with nothing new is not read at all: with hundreds of readers on one job,
    the writes are most of the cost.
    """
    job.followers += 1  # so the run's thread wakes this loop on new output
    try:
        while True:
            ended = job.ended
            chunk = bytearray()
            for name in STREAMS:
                if not (ended or job_answers.may_have_more(job, name, positions[name])):
                    continue
                try:
                    data, next_offset, _, _ = await read_stream(
                        job, name, positions[name], EVENT_BYTES
                    )
                except (Gone, StoreError) as gone:  # dropped, or the job board failed
                    yield _event("error", wire.encode(wire.Error(gone.message)))
                    return
                if next_offset != positions[name]:
                    positions[name] = next_offset
                    event_id = f"{positions['stdout']}:{positions['stderr']}"
                    chunk += _event(name, data, event_id)
            if chunk:
                yield bytes(chunk)
            elif ended:
                break
            else:
                try:
                    await job.changed()
                except StoreError as failed:  # another server's job, and the board failed
                    yield _event("error", wire.encode(wire.Error(failed.message)))
                    return
        body = result_json(job)
        if body is None:
            message = job.error or job.dropped_message or ""
            yield _event("error", wire.encode(wire.Error(message)))
        else:
            yield _event("result", body)
    finally:
        job.followers -= 1


async def job_events(request: Request) -> Response:
    """Server-Sent Events: ``stdout`` and ``stderr`` chunks as the command prints them,
    each with the id ``<stdout end>:<stderr end>`` (send it back as ``Last-Event-ID`` to
    resume exactly after it), then one ``result`` (or ``error``, for a job that never
    ran), then the end. A carriage return reads as a line end (SSE cannot carry one):
    page ``/output`` for the exact bytes."""
    job = await _job(request)
    out, err = _event_id_param(request)
    job.check_output()  # 410 if its output was dropped: there is nothing to follow
    return EventStreamResponse(
        _follow(job, {"stdout": out, "stderr": err}),
        request.app.state.streams,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- steering a job ------------------------------------------------------------------


async def cancel_job(request: Request) -> Response:
    return json_answer(await job_answers.cancel(engine_of(request), await _job(request)))


async def leave_job(request: Request) -> Response:
    """A client that started or joined the job in the background no longer wants it."""
    return json_answer(await job_answers.leave(engine_of(request), await _job(request)))


async def pause_job(request: Request) -> Response:
    return json_answer(await job_answers.pause(engine_of(request), await _job(request)))


async def resume_job(request: Request) -> Response:
    return json_answer(await job_answers.resume(engine_of(request), await _job(request)))


#: The header a reader resumes the events from.
_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": r"^\d+:\d+$"},
}

OPERATIONS = (
    Operation(
        method="GET",
        path="/api/jobs",
        endpoint=list_jobs,
        operation_id="listJobs",
        summary="Running jobs and recent ones, newest first.",
        ok=Answer("The jobs.", wire.JobList),
    ),
    Operation(
        method="GET",
        path="/api/jobs/{job_id}",
        endpoint=job_detail,
        operation_id="getJob",
        summary="One job, with its result once it has ended.",
        ok=Answer("The job.", wire.JobDetail),
        errors=("404",),
    ),
    Operation(
        method="GET",
        path="/api/jobs/{job_id}/output",
        endpoint=job_output,
        operation_id="jobOutput",
        summary="A page of one stream, while the job runs and after. Offsets count bytes of the "
        "captured stream (after the end, of the stored text's UTF-8: the same unless the "
        "output was not valid UTF-8); data never splits a UTF-8 character.",
        ok=Answer("The page.", wire.JobOutput),
        query=wire.PageQuery,
        errors=("400", "404"),
    ),
    Operation(
        method="GET",
        path="/api/jobs/{job_id}/events",
        endpoint=job_events,
        operation_id="jobEvents",
        summary="Server-Sent Events: `stdout` and `stderr` events carry output as the command "
        "prints it, each with the id `<stdout offset>:<stderr offset>` to resume after "
        "(Last-Event-ID); then one `result` event with the CommandResult JSON (or "
        "`error` for a job that never ran), then the stream ends.",
        ok=Answer("The event stream.", media="text/event-stream"),
        headers=(_LAST_EVENT_ID,),
        errors=("400", "404", "410"),
    ),
    Operation(
        method="POST",
        path="/api/jobs/{job_id}/cancel",
        endpoint=cancel_job,
        operation_id="cancelJob",
        summary="Kill the run's whole process group; it is not cached, and everyone "
        "waiting gets its result with cancelled: true.",
        ok=Answer("Cancelled.", wire.JobAction),
        errors=("404", "409"),
    ),
    Operation(
        method="POST",
        path="/api/jobs/{job_id}/leave",
        endpoint=leave_job,
        operation_id="leaveJob",
        summary="A client that started or joined the job in the background gives it "
        "up: the run is cancelled when no other background request holds it and no "
        "request waits on it (cached or not); otherwise it runs on. Its status after.",
        ok=Answer("Left.", wire.JobAction),
        errors=("404",),
    ),
    Operation(
        method="POST",
        path="/api/jobs/{job_id}/pause",
        endpoint=pause_job,
        operation_id="pauseJob",
        summary="SIGSTOP to the run's whole group; paused time does not count toward the timeout.",
        ok=Answer("Paused.", wire.JobAction),
        errors=("404", "409"),
    ),
    Operation(
        method="POST",
        path="/api/jobs/{job_id}/resume",
        endpoint=resume_job,
        operation_id="resumeJob",
        summary="SIGCONT to the run's whole group.",
        ok=Answer("Resumed.", wire.JobAction),
        errors=("404", "409"),
    ),
)
