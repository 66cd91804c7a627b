"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Built from the running config, so the limits it states (body size, timeout
and ttl caps) and whether a token is needed are the ones this server enforces.
Response objects list every field they carry and allow no others: a test checks
live responses against these schemas, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from runcache import __version__
from runcache.api import engine, json_response
from runcache.config import Config

docs = Blueprint("openapi", __name__)

Schema = dict[str, Any]

_ERROR_REF = {"$ref": "#/components/schemas/Error"}


@docs.get("/openapi.json")
def openapi_json() -> Response:
    return json_response(build(engine().config))


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
                "`{\"error\": \"...\"}` with its status; a path that does not exist answers "
                "404 and a method a path does not take answers 405 with an Allow header."
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
        "/api/command": {"post": _operation(
            "runCommand", "Run a command, or answer it from the cache.",
            ok=("The command's result.", "CommandResult"),
            errors=["400", *api_errors, "413", "503"],
            protected=protected,
            body={"$ref": "#/components/schemas/CommandRequest"},
        )},
        "/api/cache/stats": {"get": _operation(
            "cacheStats", "The cache's statistics.",
            ok=("Counts and sizes.", "CacheStats"), errors=api_errors, protected=protected,
        )},
        "/api/cache/clear": {"post": _operation(
            "clearCache",
            "Empty the cache and reset its statistics, as one step. Takes any body or none; "
            "needs the admin token when tokens are on.",
            ok=("The cache is empty.", "Cleared"), errors=[*api_errors, "503"],
            protected=protected,
        )},
        "/api/telemetry": {"get": _operation(
            "telemetry", "What the server ran, and the machine it runs on.",
            ok=("Execution counts and system metrics.", "Telemetry"), errors=api_errors,
            protected=protected,
        )},
        "/health": {"get": _operation(
            "health", "Health, cache statistics and telemetry; open without a token.",
            ok=("The server's health.", "Health"), errors=[], protected=False,
        )},
        "/livez": {"get": _operation(
            "livez", "Liveness: answers without touching the store.",
            ok=("The process is serving.", "Live"), errors=[], protected=False,
        )},
        "/openapi.json": {"get": _operation(
            "openapi", "This document.",
            ok=("The OpenAPI document.", None), errors=[], protected=False,
        )},
    }


def _operation(
    operation_id: str,
    summary: str,
    ok: tuple[str, str | None],
    errors: list[str],
    protected: bool,
    body: Schema | None = None,
) -> Schema:
    schema: Schema = {"$ref": f"#/components/schemas/{ok[1]}"} if ok[1] else {"type": "object"}
    responses: Schema = {"200": {"description": ok[0],
                                 "content": {"application/json": {"schema": schema}}}}
    for status in errors:
        responses[status] = {"$ref": f"#/components/responses/{_ERROR_NAMES[status]}"}
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
        "security": [{"bearer": []}] if protected else [],
    }
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
    "413": "TooLarge",
    "503": "Unavailable",
}


def _error_responses(config: Config) -> Schema:
    descriptions = {
        "400": "The request is malformed or asks for something out of bounds.",
        "401": "No bearer token was sent.",
        "403": "The token sent does not grant this operation.",
        "404": "No endpoint at this path.",
        "405": "The path does not take this method; the Allow header lists those it takes.",
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


def _object(properties: Schema, optional: tuple[str, ...] = ()) -> Schema:
    """An object with exactly these properties, all required but the ``optional`` ones."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


_INT = {"type": "integer", "minimum": 0}
_NUMBER = {"type": "number", "minimum": 0}
_PERCENT = {"type": "string", "pattern": r"^\d+\.\d%$"}


def _schemas(config: Config) -> Schema:
    seconds = {"type": "number", "exclusiveMinimum": 0}
    return {
        "Error": _object({"error": {"type": "string"}}),
        "CommandRequest": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "minLength": 1},
                "use_cache": {"type": "boolean", "default": True},
                "timeout": {**seconds, "maximum": config.max_timeout,
                            "default": config.default_timeout},
                "ttl": {**seconds, "maximum": config.max_ttl, "default": config.default_ttl},
            },
            "required": ["command"],
        },
        "CommandResult": _object({
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "return_code": {"type": "integer"},
            "success": {"type": "boolean"},
            "timed_out": {"type": "boolean"},
            "partial_results": {"type": "boolean"},
            "stdout_truncated": {"type": "boolean"},
            "stderr_truncated": {"type": "boolean"},
            "execution_time": _NUMBER,
            "timestamp": {"type": "string", "format": "date-time"},
            "cache_key": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "cached": {"type": "boolean"},
            "coalesced": {"type": "boolean"},
        }),
        "CacheStats": _object({
            "hits": _INT, "misses": _INT, "evictions": _INT, "expirations": _INT,
            "coalesced": _INT, "size": _INT, "max_size": _INT, "bytes": _INT, "max_bytes": _INT,
            "hit_rate": _PERCENT,
            "hit_ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "store_error": {"type": "string"},
        }, optional=("store_error",)),
        "Cleared": _object({
            "success": {"const": True},
            "message": {"const": "Cache cleared"},
        }),
        "Telemetry": _object({
            "uptime_seconds": _NUMBER,
            "commands_executed": _INT,
            "commands_succeeded": _INT,
            "commands_failed": _INT,
            "commands_timed_out": _INT,
            "cache_hits_served": _INT,
            "total_execution_time": _NUMBER,
            "success_rate": _PERCENT,
            "average_execution_time": {"type": "string", "pattern": r"^\d+\.\d\ds$"},
            "system_metrics": _object({
                "cpu_percent": _NUMBER, "memory_percent": _NUMBER, "disk_usage": _NUMBER,
            }),
        }),
        "Health": _object({
            "status": {"enum": ["healthy", "degraded"]},
            "version": {"type": "string"},
            "store": {"type": "string"},
            "cache_stats": {"$ref": "#/components/schemas/CacheStats"},
            "telemetry": {"$ref": "#/components/schemas/Telemetry"},
            "uptime": _NUMBER,
            "running_commands": _INT,
            "reason": {"type": "string"},
        }, optional=("reason",)),
        "Live": _object({"status": {"const": "ok"}}),
    }
