"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

The schemas are those of :mod:`runcache.wire`, the shapes the server decodes
and encodes, so the document cannot drift from the code. Built from the running
config, so the limits it states (body size, timeout and ttl caps) and whether a
token is needed are the ones this server enforces. Response objects list every
field they carry and allow no others; a test checks live responses against them.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from runcache import __version__, wire
from runcache.config import Config
from runcache.engine.entry_answers import DEFAULT_LIST, MAX_LIST
from runcache.engine.job_answers import DEFAULT_PAGE_BYTES, MAX_OFFSET, MAX_PAGE_BYTES
from runcache.web.responses import JSONBytes
from runcache.web.routes.commands import engine_of

Schema = dict[str, Any]

_ERROR_REF = {"$ref": "#/components/schemas/Error"}


async def openapi_json(request: Request) -> Response:
    return JSONBytes(orjson.dumps(build(engine_of(request).config)))


def build(config: Config) -> Schema:
    """The whole document for a server running with ``config``."""
    protected = bool(config.token)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "runcache",
            "version": __version__,
            "description": (
                "Runs command-line commands and caches their results. Every error is "
                '`{"error": "..."}` with its status (but for the 404s of the process '
                'routes, kept from the reference API: `{"success": false, "error": '
                '"..."}`); a path that does not exist answers 404 and a method a path does '
                "not take answers 405 with an Allow header."
            ),
        },
        "paths": _paths(config, protected),
        "components": {
            "schemas": _schemas(config),
            "responses": _error_responses(config),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _paths(config: Config, protected: bool) -> Schema:
    api_errors = ["401", "403"] if protected else []
    return {
        "/api/command": {
            "post": _operation(
                "runCommand",
                "Run a command, or answer it from the cache.",
                ok=("The command's result.", "CommandResult"),
                # 403 without tokens too: the run context rules (--allow-cwd, --env-allow).
                errors=["400", *(api_errors or ["403"]), "413", "503"],
                protected=protected,
                body={"$ref": "#/components/schemas/CommandRequest"},
                accepted=(
                    'With "background": true, at once: the job that runs the command '
                    "(already completed when the cache answered it).",
                    "JobAccepted",
                ),
            )
        },
        **_job_paths(api_errors, protected),
        **_process_paths(api_errors, protected),
        "/api/cache/stats": {
            "get": _operation(
                "cacheStats",
                "The cache's statistics.",
                ok=("Counts and sizes.", "CacheStats"),
                errors=api_errors,
                protected=protected,
            )
        },
        "/api/cache/clear": {
            "post": _operation(
                "clearCache",
                "Empty the cache and reset its statistics, as one step. Takes any body or none; "
                "needs the admin token when tokens are on.",
                ok=("The cache is empty.", "Cleared"),
                errors=[*api_errors, "503"],
                protected=protected,
            )
        },
        **_entry_paths(api_errors, protected),
        "/api/telemetry": {
            "get": _operation(
                "telemetry",
                "What the server ran, and the machine it runs on.",
                ok=("Execution counts and system metrics.", "Telemetry"),
                errors=api_errors,
                protected=protected,
            )
        },
        "/health": {
            "get": _operation(
                "health",
                "Health, cache statistics and telemetry; open without a token.",
                ok=("The server's health.", "Health"),
                errors=[],
                protected=False,
            )
        },
        "/livez": {
            "get": _operation(
                "livez",
                "Liveness: answers without touching the store.",
                ok=("The process is serving.", "Live"),
                errors=[],
                protected=False,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics in the text format: counts no clear resets, "
                "durations, and the cache's size now.",
                ok=("The metrics.", None),
                errors=api_errors,
                protected=protected,
                media="text/plain",
            )
        },
        "/": {
            "get": _operation(
                "dashboard",
                "The dashboard: one HTML page that reads this API with the token "
                "typed into it; open without a token, as it holds no data.",
                ok=("The page.", None),
                errors=[],
                protected=False,
                media="text/html",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document.",
                ok=("The OpenAPI document.", None),
                errors=[],
                protected=False,
            )
        },
    }


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
}

_CACHE_KEY = {
    "name": "cache_key",
    "in": "path",
    "required": True,
    "description": "The entry's key: `cache_key` in a result or a listing.",
    "schema": {"type": "string"},
}


def _query(name: str, description: str, schema: Schema) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _page_parameters() -> list[Schema]:
    """The query of a page of output: a job's or a cache entry's."""
    return [
        _query(
            "stream",
            "The stream to read.",
            {"type": "string", "enum": ["stdout", "stderr"], "default": "stdout"},
        ),
        _query(
            "offset",
            "The first byte to read.",
            {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
        ),
        _query(
            "limit",
            "Most bytes to read.",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_PAGE_BYTES,
                "default": DEFAULT_PAGE_BYTES,
            },
        ),
    ]


def _entry_paths(api_errors: list[str], protected: bool) -> Schema:
    """The cache entries API (:mod:`runcache.web.routes.entries`). None of it counts a hit or a
    miss; the deletions need the admin token when tokens are on."""
    errors = [*api_errors, "404", "503"]
    return {
        "/api/cache/entries": {
            "get": _operation(
                "listEntries",
                "Live cache entries, newest first; counts no hit or miss.",
                ok=("A page of entries.", "CacheEntryList"),
                errors=["400", *api_errors, "503"],
                protected=protected,
                parameters=[
                    _query(
                        "prefix",
                        "Only entries whose command starts with this.",
                        {"type": "string", "default": ""},
                    ),
                    _query(
                        "offset",
                        "Entries to skip.",
                        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                    ),
                    _query(
                        "limit",
                        "Most entries to list.",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIST,
                            "default": DEFAULT_LIST,
                        },
                    ),
                ],
            )
        },
        "/api/cache/entries/{cache_key}": {
            "get": _operation(
                "getEntry",
                "One live entry and the result it holds; counts no hit.",
                ok=("The entry.", "CacheEntryDetail"),
                errors=errors,
                protected=protected,
                parameters=[_CACHE_KEY],
            ),
            "delete": _operation(
                "deleteEntry",
                "Delete one live entry; needs the admin token when tokens are "
                "on. Counts no eviction.",
                ok=("Deleted.", "Deleted"),
                errors=errors,
                protected=protected,
                parameters=[_CACHE_KEY],
            ),
        },
        "/api/cache/entries/{cache_key}/output": {
            "get": _operation(
                "entryOutput",
                "A page of one stream of a stored result, as a finished job's output is paged: "
                "offsets count bytes of the stored text's UTF-8, and data never splits a "
                "character.",
                ok=("The page.", "JobOutput"),
                errors=["400", *errors, "410"],
                protected=protected,
                parameters=[_CACHE_KEY, *_page_parameters()],
            )
        },
        "/api/cache/invalidate": {
            "post": _operation(
                "invalidateEntries",
                "Delete every live entry whose command starts with `prefix`, or matches the "
                "shell-style pattern `glob` as a whole (exactly one of them); needs the admin "
                "token when tokens are on. Statistics are not reset.",
                ok=("How many entries went.", "Deleted"),
                errors=["400", *api_errors, "413", "503"],
                protected=protected,
                body={"$ref": "#/components/schemas/InvalidateRequest"},
            )
        },
    }


def _job_paths(api_errors: list[str], protected: bool) -> Schema:
    """The jobs API (:mod:`runcache.web.routes.jobs`): every run, followed and steered."""
    errors = [*api_errors, "404"]
    steering = [*errors, "409"]
    return {
        "/api/jobs": {
            "get": _operation(
                "listJobs",
                "Running jobs and recent ones, newest first.",
                ok=("The jobs.", "JobList"),
                errors=api_errors,
                protected=protected,
            )
        },
        "/api/jobs/{job_id}": {
            "get": _operation(
                "getJob",
                "One job, with its result once it has ended.",
                ok=("The job.", "JobDetail"),
                errors=errors,
                protected=protected,
                parameters=[_JOB_ID],
            )
        },
        "/api/jobs/{job_id}/output": {
            "get": _operation(
                "jobOutput",
                "A page of one stream, while the job runs and after. Offsets count bytes of the "
                "captured stream (after the end, of the stored text's UTF-8: the same unless the "
                "output was not valid UTF-8); data never splits a UTF-8 character.",
                ok=("The page.", "JobOutput"),
                errors=["400", *errors],
                protected=protected,
                parameters=[_JOB_ID, *_page_parameters()],
            )
        },
        "/api/jobs/{job_id}/events": {
            "get": _operation(
                "jobEvents",
                "Server-Sent Events: `stdout` and `stderr` events carry output as the command "
                "prints it, each with the id `<stdout offset>:<stderr offset>` to resume after "
                "(Last-Event-ID); then one `result` event with the CommandResult JSON (or "
                "`error` for a job that never ran), then the stream ends.",
                ok=("The event stream.", None),
                errors=["400", *errors, "410"],
                protected=protected,
                parameters=[
                    _JOB_ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": r"^\d+:\d+$"},
                    },
                ],
                media="text/event-stream",
            )
        },
        "/api/jobs/{job_id}/cancel": {
            "post": _operation(
                "cancelJob",
                "Kill the run's whole process group; it is not cached, and everyone "
                "waiting gets its result with cancelled: true.",
                ok=("Cancelled.", "JobAction"),
                errors=steering,
                protected=protected,
                parameters=[_JOB_ID],
            )
        },
        "/api/jobs/{job_id}/leave": {
            "post": _operation(
                "leaveJob",
                "A client that started or joined the job in the background gives it "
                "up: the run is cancelled when no other background request holds it and no "
                "request waits on it (cached or not); otherwise it runs on. Its status after.",
                ok=("Left.", "JobAction"),
                errors=errors,
                protected=protected,
                parameters=[_JOB_ID],
            )
        },
        "/api/jobs/{job_id}/pause": {
            "post": _operation(
                "pauseJob",
                "SIGSTOP to the run's whole group; paused time does not count toward the timeout.",
                ok=("Paused.", "JobAction"),
                errors=steering,
                protected=protected,
                parameters=[_JOB_ID],
            )
        },
        "/api/jobs/{job_id}/resume": {
            "post": _operation(
                "resumeJob",
                "SIGCONT to the run's whole group.",
                ok=("Resumed.", "JobAction"),
                errors=steering,
                protected=protected,
                parameters=[_JOB_ID],
            )
        },
    }


_PID = {
    "name": "pid",
    "in": "path",
    "required": True,
    "description": "The pid of the run's process-group leader.",
    "schema": {"type": "string"},
}


def _process_paths(api_errors: list[str], protected: bool) -> Schema:
    """The process routes kept from the reference API (:mod:`runcache.web.routes.processes`),
    over the same jobs. Their 404 is the reference's ``ProcessFailure``, not ``Error``."""
    not_found = {
        "description": "No running run has this pid (or it cannot do this now).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ProcessFailure"}}
        },
    }

    def on_pid(operation_id: str, summary: str, ok: tuple[str, str]) -> Schema:
        operation = _operation(
            operation_id, summary, ok=ok, errors=api_errors, protected=protected, parameters=[_PID]
        )
        operation["responses"]["404"] = not_found
        return operation

    return {
        "/api/processes/list": {
            "get": _operation(
                "listProcesses",
                "Running and paused runs, keyed by pid.",
                ok=("The runs.", "ProcessList"),
                errors=api_errors,
                protected=protected,
            )
        },
        "/api/processes/status/{pid}": {
            "get": on_pid(
                "getProcess",
                "The run with this pid: the running one, else the last that ended.",
                ok=("The run.", "ProcessDetail"),
            )
        },
        "/api/processes/terminate/{pid}": {
            "post": on_pid(
                "terminateProcess",
                "Kill the run's whole process group (a cancel).",
                ok=("Terminated.", "ProcessDone"),
            )
        },
        "/api/processes/pause/{pid}": {
            "post": on_pid(
                "pauseProcess",
                "SIGSTOP to the run's whole group.",
                ok=("Paused.", "ProcessDone"),
            )
        },
        "/api/processes/resume/{pid}": {
            "post": on_pid(
                "resumeProcess",
                "SIGCONT to the run's whole group.",
                ok=("Resumed.", "ProcessDone"),
            )
        },
        "/api/processes/dashboard": {
            "get": _operation(
                "processDashboard",
                "The running runs, and the machine's load (read at once).",
                ok=("The dashboard.", "Dashboard"),
                errors=api_errors,
                protected=protected,
            )
        },
        "/api/process/execute-async": {
            "post": _operation(
                "executeAsync",
                "Start a command in the background; the task id is its job id.",
                ok=("Submitted.", "TaskSubmitted"),
                errors=["400", *api_errors, "413", "503"],
                protected=protected,
                body={"$ref": "#/components/schemas/CommandRequest"},
            )
        },
        "/api/process/get-task-result/{task_id}": {
            "get": _operation(
                "getTaskResult",
                "Where a task stands, with its result once it has ended.",
                ok=("The task.", "TaskResult"),
                errors=[*api_errors, "404"],
                protected=protected,
                parameters=[{**_JOB_ID, "name": "task_id"}],
            )
        },
    }


def _operation(
    operation_id: str,
    summary: str,
    ok: tuple[str, str | None],
    errors: list[str],
    protected: bool,
    body: Schema | None = None,
    accepted: tuple[str, str] | None = None,
    parameters: list[Schema] | None = None,
    media: str = "application/json",
) -> Schema:
    schema: Schema = (
        {"$ref": f"#/components/schemas/{ok[1]}"}
        if ok[1]
        else {"type": "object"}
        if media == "application/json"
        else {"type": "string"}
    )
    responses: Schema = {"200": {"description": ok[0], "content": {media: {"schema": schema}}}}
    if accepted is not None:
        responses["202"] = {
            "description": accepted[0],
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{accepted[1]}"}}
            },
        }
    for status in errors:
        responses[status] = {"$ref": f"#/components/responses/{_ERROR_NAMES[status]}"}
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
        "security": [{"bearer": []}] if protected else [],
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return operation


_ERROR_NAMES = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "405": "MethodNotAllowed",
    "409": "Conflict",
    "410": "Gone",
    "413": "TooLarge",
    "503": "Unavailable",
}


def _error_responses(config: Config) -> Schema:
    descriptions = {
        "400": "The request is malformed or asks for something out of bounds.",
        "401": "No bearer token was sent.",
        "403": "The token sent does not grant this operation, or the server's rules refuse "
        "the run context asked for (a cwd outside --allow-cwd, an env variable "
        "--env-allow does not name).",
        "404": "No endpoint at this path, or no job with this id on this server (that this "
        "token started or joined, unless it is the admin token), or no "
        "live cache entry with this key.",
        "405": "The path does not take this method; the Allow header lists those it takes.",
        "409": "The job cannot do this now: it has ended, or is paused already, or is not.",
        "410": "The job's output was dropped to keep finished jobs' output under "
        "--job-output-bytes; its record is still listed.",
        "413": f"The body is larger than {config.max_body_bytes} bytes.",
        "503": "Every command slot stayed busy (Retry-After says when to retry), "
        "or the cache store is down.",
    }
    responses: Schema = {}
    for status, name in _ERROR_NAMES.items():
        response: Schema = {
            "description": descriptions[status],
            "content": {"application/json": {"schema": _ERROR_REF}},
        }
        header = {"401": "WWW-Authenticate", "405": "Allow", "503": "Retry-After"}.get(status)
        if header:
            response["headers"] = {header: {"schema": {"type": "string"}}}
        responses[name] = response
    return responses


def _schemas(config: Config) -> Schema:
    """The components of :mod:`runcache.wire`, the request's with this server's bounds."""
    components = wire.schema_components()
    components["CommandRequest"] = wire.command_request_schema(
        {
            "timeout": (config.max_timeout, config.default_timeout),
            "ttl": (config.max_ttl, config.default_ttl),
            "stale": (config.max_stale, config.default_stale),
        }
    )
    return components
