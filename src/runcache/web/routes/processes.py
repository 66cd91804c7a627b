"""The process routes kept from the reference API, served over the engine's jobs.

The server runcache stands in for lets a client list, watch, terminate, pause
and resume the commands it runs, and run one asynchronously; its MCP client
offers these as tools. These routes keep its paths and shapes
(``spec/processes.md``) so those clients work unchanged: answers carry
``"success"``, and a pid that names no run answers 404 with
``{"success": false, "error": ...}``. The answers are built by
:mod:`runcache.engine.job_answers`, which the MCP tools share.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from runcache import wire
from runcache.engine import job_answers
from runcache.engine.callers import caller_of, viewer_of
from runcache.web.operations import Answer, Operation
from runcache.web.responses import json_answer
from runcache.web.routes.commands import engine_of, read_body


async def list_processes(request: Request) -> Response:
    return json_answer(await job_answers.process_list(engine_of(request), viewer_of(request.scope)))


async def process_status(request: Request) -> Response:
    return json_answer(
        await job_answers.process_status(
            engine_of(request), request.path_params["pid"], viewer_of(request.scope)
        )
    )


async def terminate_process(request: Request) -> Response:
    return await _steer(request, "terminate")


async def pause_process(request: Request) -> Response:
    return await _steer(request, "pause")


async def resume_process(request: Request) -> Response:
    return await _steer(request, "resume")


async def _steer(request: Request, verb: str) -> Response:
    engine = engine_of(request)
    return json_answer(
        await job_answers.steer_process(
            engine, request.path_params["pid"], verb, viewer_of(request.scope)
        )
    )


async def dashboard(request: Request) -> Response:
    return json_answer(await job_answers.dashboard(engine_of(request), viewer_of(request.scope)))


async def execute_async(request: Request) -> Response:
    """Start a command in the background (the body of ``POST /api/command``); its task id
    is its job's id, so ``/api/jobs/{task_id}`` follows it too."""
    engine = engine_of(request)
    command = wire.decode_command_request(await read_body(request, engine.config.max_body_bytes))
    job, _ = await engine.start(command, caller_of(request.scope))
    return json_answer(job_answers.task_submitted(job))


async def task_result(request: Request) -> Response:
    return json_answer(
        await job_answers.task_result(
            engine_of(request), request.path_params["task_id"], viewer_of(request.scope)
        )
    )


#: A process route's 404 is the reference's ``ProcessFailure``, not ``Error``.
_NO_SUCH_RUN = {
    "404": Answer("No running run has this pid (or it cannot do this now).", wire.ProcessFailure)
}

OPERATIONS = (
    Operation(
        method="GET",
        path="/api/processes/list",
        endpoint=list_processes,
        operation_id="listProcesses",
        summary="Running and paused runs, keyed by pid.",
        ok=Answer("The runs.", wire.ProcessList),
    ),
    Operation(
        method="GET",
        path="/api/processes/status/{pid}",
        endpoint=process_status,
        operation_id="getProcess",
        summary="The run with this pid: the running one, else the last that ended.",
        ok=Answer("The run.", wire.ProcessDetail),
        failures=_NO_SUCH_RUN,
        errors=("409",),
    ),
    Operation(
        method="POST",
        path="/api/processes/terminate/{pid}",
        endpoint=terminate_process,
        operation_id="terminateProcess",
        summary="Kill the run's whole process group (a cancel).",
        ok=Answer("Terminated.", wire.ProcessDone),
        failures=_NO_SUCH_RUN,
        errors=("409",),
    ),
    Operation(
        method="POST",
        path="/api/processes/pause/{pid}",
        endpoint=pause_process,
        operation_id="pauseProcess",
        summary="SIGSTOP to the run's whole group.",
        ok=Answer("Paused.", wire.ProcessDone),
        failures=_NO_SUCH_RUN,
        errors=("409",),
    ),
    Operation(
        method="POST",
        path="/api/processes/resume/{pid}",
        endpoint=resume_process,
        operation_id="resumeProcess",
        summary="SIGCONT to the run's whole group.",
        ok=Answer("Resumed.", wire.ProcessDone),
        failures=_NO_SUCH_RUN,
        errors=("409",),
    ),
    Operation(
        method="GET",
        path="/api/processes/dashboard",
        endpoint=dashboard,
        operation_id="processDashboard",
        summary="The running runs, and the machine's load (read at once).",
        ok=Answer("The dashboard.", wire.Dashboard),
    ),
    Operation(
        method="POST",
        path="/api/process/execute-async",
        endpoint=execute_async,
        operation_id="executeAsync",
        summary="Start a command in the background; the task id is its job id.",
        ok=Answer("Submitted.", wire.TaskSubmitted),
        body=wire.CommandRequest,
        errors=("400", "413", "503"),
    ),
    Operation(
        method="GET",
        path="/api/process/get-task-result/{task_id}",
        endpoint=task_result,
        operation_id="getTaskResult",
        summary="Where a task stands, with its result once it has ended.",
        ok=Answer("The task.", wire.TaskResult),
        errors=("404",),
    ),
)
