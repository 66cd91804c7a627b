"""What a route declares beside its handler, so that the route and its description
are one declaration.

Each module of ``routes/`` lists its :class:`Operation`\\ s: the method and path, the
handler, and what the OpenAPI document says of it (its id, summary, query, body,
answers and errors), whether only the admin token may call it, and whether it is
open without a token. The app serves them (:func:`routes`), the token gate takes
the admin ones from them, and :mod:`runcache.web.openapi` describes them: an
operation cannot be served undescribed, or described as something else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any

from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runcache import wire

Endpoint = Callable[[Request], Awaitable[Response]]

JSON = "application/json"


@dataclass(frozen=True)
class Answer:
    """One answer of an operation: what it means, and the shape it carries (a JSON object
    of no declared shape when None), or plain text of another media type."""

    description: str
    shape: type[Struct] | None = None
    media: str = JSON


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One method on one path, and everything the API says of it.

    ``errors`` are the statuses it answers with the one error shape (401 and 403
    are added when tokens are on, unless it is ``open``); ``failures`` are answers
    of another shape for an error status (the process routes' 404). ``query`` is the
    Struct its handler decodes the query string through (:func:`wire.decode_query`),
    ``body`` the one it decodes its body through. A parameter in the path is
    described by :data:`PATH_PARAMETERS`; ``headers`` are header parameters, as
    OpenAPI objects.
    """

    method: str
    path: str
    endpoint: Endpoint
    operation_id: str
    summary: str
    ok: Answer
    accepted: Answer | None = None
    query: type[Struct] | None = None
    body: type[Struct] | None = None
    errors: tuple[str, ...] = ()
    failures: Mapping[str, Answer] = field(default_factory=lambda: MappingProxyType({}))
    headers: tuple[Mapping[str, Any], ...] = ()
    admin: bool = False
    open: bool = False


def routes(operations: Iterable[Operation]) -> list[Route]:
    """The Starlette routes that serve ``operations``: one per method and path, as a path
    may take one method openly and another only from the admin."""
    return [
        Route(operation.path, operation.endpoint, methods=[operation.method])
        for operation in operations
    ]


def admin_routes(operations: Iterable[Operation]) -> list[tuple[str, str]]:
    """The (method, path template) pairs only the admin token may call."""
    return [(operation.method, operation.path) for operation in operations if operation.admin]


#: Every parameter a path may hold, by name: the same name means the same thing in
#: every path (a task id is a job id).
PATH_PARAMETERS: Mapping[str, Any] = MappingProxyType(
    {
        "job_id": wire.JobId,
        "task_id": wire.JobId,
        "cache_key": Annotated[
            str, Meta(description="The entry's key: `cache_key` in a result or a listing.")
        ],
        "pid": Annotated[str, Meta(description="The pid of the run's process-group leader.")],
    }
)
