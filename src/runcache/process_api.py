"""The process routes kept from the reference API, served over the engine's jobs.

The server runcache stands in for lets a client list, watch, terminate, pause
and resume the commands it runs, and run one asynchronously; its MCP client
offers these as tools. These routes keep its paths and shapes
(``spec/processes.md``) so those clients work unchanged: answers carry
``"success"``, and a pid that names no run answers 404 with
``{"success": false, "error": ...}``. A run's pid is the pid of its process
group's leader; one still waiting for a slot has none yet and is not listed.

Nothing here knows more about a run than its job does: a shell command tells
nobody how far along it is, so progress is always 0.0 and the eta unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from datetime import datetime, timezone

import msgspec
import psutil
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runcache import wire
from runcache.api import client_of, engine_of, read_body
from runcache.errors import NotFound
from runcache.jobs import Job
from runcache.jobs_api import record, result_json
from runcache.responses import json_answer
from runcache.service import Engine

#: How long a terminate waits for the run to end, so its group is gone when it answers.
TERMINATE_WAIT_SECONDS = 5.0

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
    return datetime.now(timezone.utc).isoformat()


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


#: A job's status as the reference's four: a cancelled run was terminated, any other
#: end (failed and timed out too) completed.
_STATUS: dict[str, wire.ProcessStatus] = {
    "running": "running", "paused": "paused", "cancelled": "terminated",
}


def _status(job: Job) -> wire.ProcessStatus:
    return _STATUS.get(job.status, "completed")


def _process(job: Job, pid: int) -> wire.Process:
    job_record = record(job)
    return wire.Process(
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


def _active(engine: Engine) -> list[tuple[int, Job]]:
    """Running and paused runs that have a process, oldest first, as the reference lists them."""
    return [(job.pid, job) for job in reversed(engine.jobs.running()) if job.pid is not None]


def _pid(request: Request, failure: str) -> int:
    """The path's pid; text that is no pid names no run, and answers the route's 404."""
    text: str = request.path_params["pid"]
    if not _PID.match(text):
        raise ProcessNotFound(failure.format(pid=text))
    return int(text)


def _find(engine: Engine, pid: int) -> Job | None:
    """The run whose group leader is ``pid``: the one running, else the last one that ended
    (kept for ``--job-retention``), so a status read just after the end still answers."""
    running = engine.jobs.by_pid(pid)
    if running is not None:
        return running
    return next((job for job in engine.jobs.listing() if job.pid == pid), None)


# -- the routes ----------------------------------------------------------------------


async def list_processes(request: Request) -> Response:
    active = _active(engine_of(request))
    return json_answer(wire.ProcessList(
        active_processes={str(pid): _process(job, pid) for pid, job in active},
        total_count=len(active),
    ))


async def process_status(request: Request) -> Response:
    failure = "Process {pid} not found"
    pid = _pid(request, failure)
    job = _find(engine_of(request), pid)
    if job is None:
        raise ProcessNotFound(failure.format(pid=pid))
    return json_answer(wire.ProcessDetail(process=_process(job, pid)))


def _steer(request: Request, verb: str, act: Callable[[Engine, Job], bool]) -> tuple[int, Job]:
    """The pid in the path and its running job, once ``act`` has worked on it; else the 404."""
    failure = f"Failed to {verb} process {{pid}} or process not found"
    pid = _pid(request, failure)
    engine = engine_of(request)
    job = engine.jobs.by_pid(pid)
    if job is None or not act(engine, job):
        raise ProcessNotFound(failure.format(pid=pid))
    return pid, job


def _done(pid: int, done: str) -> Response:
    return json_answer(wire.ProcessDone(message=f"Process {pid} {done} successfully"))


async def terminate_process(request: Request) -> Response:
    """Kill the run's whole group (a cancel: not cached, its waiters get the cancelled
    result), and answer once the run has ended, or after ``TERMINATE_WAIT_SECONDS``."""
    pid, job = _steer(request, "terminate", Engine.cancel)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_end_of(job), TERMINATE_WAIT_SECONDS)
    return _done(pid, "terminated")


async def pause_process(request: Request) -> Response:
    pid, _ = _steer(request, "pause", Engine.pause)
    return _done(pid, "paused")


async def resume_process(request: Request) -> Response:
    pid, _ = _steer(request, "resume", Engine.resume)
    return _done(pid, "resumed")


async def _end_of(job: Job) -> None:
    while not job.ended:
        await job.changed()


def _system_load() -> wire.SystemLoad:
    """The machine's load, read at once: ``cpu_percent`` compares with the previous call
    (the telemetry primes it) instead of sampling for a second as the reference does."""
    connections = psutil.Process().net_connections(kind="tcp")
    return wire.SystemLoad(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        active_connections=sum(1 for connection in connections
                               if connection.status == psutil.CONN_ESTABLISHED),
    )


async def dashboard(request: Request) -> Response:
    active = _active(engine_of(request))
    load = await run_in_threadpool(_system_load)  # reads /proc: off the event loop
    return json_answer(wire.Dashboard(
        timestamp=_now(),
        total_processes=len(active),
        processes=[_dashboard_entry(job, pid) for pid, job in active],
        system_load=load,
    ))


async def execute_async(request: Request) -> Response:
    """Start a command in the background (the body of ``POST /api/command``); its task id
    is its job's id, so ``/api/jobs/{task_id}`` follows it too."""
    engine = engine_of(request)
    command = wire.decode_command_request(await read_body(request, engine.config.max_body_bytes))
    job = await engine.submit(command, client_of(request))
    return json_answer(wire.TaskSubmitted(task_id=job.job_id, command=job.command,
                                          timestamp=_now()))


async def task_result(request: Request) -> Response:
    try:
        job = engine_of(request).jobs.get(request.path_params["task_id"])
    except NotFound:
        raise NotFound("Task not found") from None
    body = result_json(job)
    result = None if body is None else msgspec.json.decode(body, type=wire.CommandResult)
    status: wire.TaskStatus = ("running" if not job.ended
                               else "completed" if job.status == "completed" else "failed")
    return json_answer(wire.TaskResult(
        task_id=job.job_id,
        result=wire.TaskState(status=status, result=result,
                              execution_time=round(job.runtime, 6)),
        timestamp=_now(),
    ))


ROUTES = [
    Route("/api/processes/list", list_processes, methods=["GET"]),
    Route("/api/processes/status/{pid}", process_status, methods=["GET"]),
    Route("/api/processes/terminate/{pid}", terminate_process, methods=["POST"]),
    Route("/api/processes/pause/{pid}", pause_process, methods=["POST"]),
    Route("/api/processes/resume/{pid}", resume_process, methods=["POST"]),
    Route("/api/processes/dashboard", dashboard, methods=["GET"]),
    Route("/api/process/execute-async", execute_async, methods=["POST"]),
    Route("/api/process/get-task-result/{task_id}", task_result, methods=["GET"]),
]
