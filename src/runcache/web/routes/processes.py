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
from starlette.routing import Route

from runcache import wire
from runcache.engine import job_answers
from runcache.engine.callers import caller_of, viewer_of
from runcache.web.responses import json_answer
from runcache.web.routes.commands import engine_of, read_body


async def list_processes(request: Request) -> Response:
    return json_answer(job_answers.process_list(engine_of(request), viewer_of(request.scope)))


async def process_status(request: Request) -> Response:
    return json_answer(
        job_answers.process_status(
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
        job_answers.task_result(
            engine_of(request), request.path_params["task_id"], viewer_of(request.scope)
        )
    )


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
