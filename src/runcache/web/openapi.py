"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Written from the operations the routes declare (:mod:`runcache.web.operations`), the
ones the app serves: each path, method, id, summary, query, body and answer is the
route's own declaration, and the schemas are those of :mod:`runcache.wire`, the
shapes the server decodes and encodes, so the document cannot drift from the code.
Built from the running config, so the limits it states (body size, timeout and ttl
caps) and whether a token is needed are the ones this server enforces. Response
objects list every field they carry and allow no others; a test checks live
responses against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path

from runcache import __version__, wire
from runcache.config import Config
from runcache.web.operations import JSON, PATH_PARAMETERS, Answer, Operation
from runcache.web.responses import JSONBytes
from runcache.web.routes.commands import engine_of

Schema = dict[str, Any]

_ERROR_REF = {"$ref": "#/components/schemas/Error"}

_COMPONENT = "#/components/schemas/{name}"


async def openapi_json(request: Request) -> Response:
    operations: tuple[Operation, ...] = request.app.state.operations
    engine = engine_of(request)
    document = build(engine.config, operations, pools=engine.pools is not None)
    return JSONBytes(msgspec.json.encode(document))


OPERATION = Operation(
    method="GET",
    path="/openapi.json",
    endpoint=openapi_json,
    operation_id="openapi",
    summary="This document.",
    ok=Answer("The OpenAPI document."),
    open=True,
)


def build(config: Config, operations: Iterable[Operation], pools: bool = False) -> Schema:
    """The whole document for a server running with ``config`` and serving ``operations``
    (with worker ``pools`` when its store holds them)."""
    protected = bool(config.token)
    paths: Schema = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(
            operation, protected
        )
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
        "paths": paths,
        "components": {
            "schemas": _schemas(config, pools),
            "responses": _error_responses(config),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(operation: Operation, protected: bool) -> Schema:
    """One operation object. Behind a token, every operation that is not open may also
    answer 401 (no token) and 403 (a token that does not grant it)."""
    guarded = protected and not operation.open
    responses: Schema = {"200": _response(operation.ok)}
    if operation.accepted is not None:
        responses["202"] = _response(operation.accepted)
    for status in {*operation.errors, *(("401", "403") if guarded else ())}:
        responses[status] = {"$ref": f"#/components/responses/{_ERROR_NAMES[status]}"}
    for status, answer in operation.failures.items():
        responses[status] = _response(answer)
    described: Schema = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "responses": dict(sorted(responses.items())),
        "security": [{"bearer": []}] if guarded else [],
    }
    parameters = [
        *_path_parameters(operation.path),
        *(dict(header) for header in operation.headers),
        *_query_parameters(operation.query),
    ]
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _reference(operation.body)}},
        }
    return described


def _response(answer: Answer) -> Schema:
    schema: Schema = (
        _reference(answer.shape)
        if answer.shape is not None
        else {"type": "object"}
        if answer.media == JSON
        else {"type": "string"}
    )
    return {"description": answer.description, "content": {answer.media: {"schema": schema}}}


def _reference(shape: type[Struct]) -> Schema:
    """A shape's component, named as :func:`wire.schema_components` names it."""
    return {"$ref": _COMPONENT.format(name=shape.__name__)}


def _path_parameters(path: str) -> list[Schema]:
    """The parameters a path template holds, each as :data:`PATH_PARAMETERS` declares it."""
    parameters = []
    for name in compile_path(path)[2]:
        if name not in PATH_PARAMETERS:
            raise ValueError(f"{path}: the path parameter {name} is not in PATH_PARAMETERS")
        schema = msgspec.json.schema(PATH_PARAMETERS[name])
        parameters.append(_parameter(name, "path", True, schema))
    return parameters


def _query_parameters(shape: type[Struct] | None) -> list[Schema]:
    """A query Struct's fields as query parameters, with their bounds and defaults."""
    if shape is None:
        return []
    _, components = msgspec.json.schema_components((shape,), ref_template=_COMPONENT)
    schema = components[shape.__name__]
    required = set(schema.get("required", ()))
    return [
        _parameter(name, "query", name in required, field)
        for name, field in schema["properties"].items()
    ]


def _parameter(name: str, where: str, required: bool, schema: Mapping[str, Any]) -> Schema:
    """A parameter object: what the field's schema describes it as, said of the parameter."""
    schema = dict(schema)
    description = schema.pop("description", None)
    parameter: Schema = {"name": name, "in": where, "required": required}
    if description is not None:
        parameter["description"] = description
    parameter["schema"] = schema
    return parameter


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


def _schemas(config: Config, pools: bool) -> Schema:
    """The components of :mod:`runcache.wire`, the request's with this server's bounds."""
    components = wire.schema_components()
    components["CommandRequest"] = wire.command_request_schema(
        {
            "timeout": (config.max_timeout, config.default_timeout),
            "ttl": (config.max_ttl, config.default_ttl),
            "stale": (config.max_stale, config.default_stale),
        },
        pools,
    )
    return components
