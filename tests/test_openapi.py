"""/openapi.json: a valid OpenAPI 3.1 document that describes every endpoint as served."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from runcache import wire
from runcache.web.app import OPERATIONS

from conftest import LiveServer

TOKEN = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"

Document = dict[str, Any]


def test_document_is_valid_openapi_3_1(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_is_described_and_nothing_else(app: Starlette, client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    described = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert all(isinstance(route, Route) for route in app.routes), app.routes  # no mounts
    served = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # Starlette adds HEAD to every GET route
    }
    assert described == served


def test_without_a_token_no_operation_needs_one(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["security"] == []
            assert "401" not in operation["responses"]
            # Only the run context rules (--allow-cwd, --env-allow) refuse without tokens.
            if operation["operationId"] != "runCommand":
                assert "403" not in operation["responses"]


def test_document_states_this_servers_limits(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(
        max_timeout=60.0,
        default_timeout=30.0,
        max_ttl=600.0,
        default_ttl=120.0,
        max_stale=90.0,
        default_stale=5.0,
        max_body_bytes=4096,
    )
    document = client.get("/openapi.json").json()
    request = document["components"]["schemas"]["CommandRequest"]["properties"]
    for name, maximum, default in (
        ("timeout", 60.0, 30.0),
        ("ttl", 600.0, 120.0),
        ("stale", 90.0, 5.0),
    ):
        number = next(option for option in request[name]["anyOf"] if option["type"] == "number")
        assert (number["maximum"], request[name]["default"]) == (maximum, default)
    assert "4096 bytes" in document["components"]["responses"]["TooLarge"]["description"]


def test_components_are_the_wire_shapes_and_only_the_request_carries_the_config(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(
        max_timeout=60.0,
        default_timeout=30.0,
        max_ttl=600.0,
        default_ttl=120.0,
        max_stale=90.0,
        default_stale=5.0,
    )
    served = client.get("/openapi.json").json()["components"]["schemas"]
    declared = wire.schema_components()
    assert served.keys() == declared.keys()
    request = served.pop("CommandRequest")
    assert served == {name: schema for name, schema in declared.items() if name != "CommandRequest"}
    # The request is wire's with each bound and default written in, and nothing else changed.
    for name, maximum, default in (
        ("timeout", 60.0, 30.0),
        ("ttl", 600.0, 120.0),
        ("stale", 90.0, 5.0),
    ):
        field = request["properties"][name]
        number = next(option for option in field["anyOf"] if option["type"] == "number")
        assert (number.pop("maximum"), field["default"]) == (maximum, default)
        field["default"] = None
    # A memory store holds no worker pools: a pool may only be null.
    assert request["properties"].pop("pool")["type"] == "null"
    declared["CommandRequest"]["properties"].pop("pool")
    assert request == declared["CommandRequest"]


def test_every_answer_schema_allows_only_the_fields_it_lists(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    requests = {shape.__name__ for shape in wire.SHAPES if issubclass(shape, wire.Request)}
    assert requests == {"CommandRequest", "InvalidateRequest"}
    answers = {name: schema for name, schema in schemas.items() if name not in requests}
    assert {"CommandResult", "Error", "SystemMetrics"} <= answers.keys()
    assert all(schema["additionalProperties"] is False for schema in answers.values())


def test_the_token_gate_does_what_the_declarations_say(
    client_factory: Callable[..., TestClient],
) -> None:
    """An operation the document leaves open is open; one it puts behind the token answers 401
    without one; the operations declared admin, and only those, refuse a plain token."""
    client = client_factory(token=TOKEN, admin_token=ADMIN)
    document = client.get("/openapi.json").json()
    admin = {(operation.method, operation.path) for operation in OPERATIONS if operation.admin}
    assert admin == {
        ("POST", "/api/cache/clear"),
        ("DELETE", "/api/cache/entries/{cache_key}"),
        ("POST", "/api/cache/invalidate"),
    }
    for template, item in document["paths"].items():
        path = re.sub(r"\{[a-z_]+\}", "nosuch", template)
        for method, operation in item.items():
            bare = client.request(method, path)
            assert (bare.status_code == 401) == bool(operation["security"]), (method, path)
            plain = client.request(method, path, headers=_USER)
            refused = plain.status_code == 403 and "admin token" in plain.text
            assert refused == ((method.upper(), template) in admin), (method, path, plain.text)


def _check(document: Document, method: str, path: str, response: requests.Response) -> None:
    """The response's status is documented for the operation and its body fits that schema."""
    path = _described_path(document, path)
    status = str(response.status_code)
    if status == "405":  # a method the path does not take has no operation to describe it
        assert method.lower() not in document["paths"][path]
        documented: Document = {"$ref": "#/components/responses/MethodNotAllowed"}
    else:
        operation = document["paths"][path][method.lower()]
        assert status in operation["responses"], f"{method} {path} answered undocumented {status}"
        documented = operation["responses"][status]
    if "$ref" in documented:
        documented = document["components"]["responses"][documented["$ref"].split("/")[-1]]
    assert response.headers["Content-Type"] == "application/json"
    for header in documented.get("headers", {}):
        assert header in response.headers, f"{method} {path} {status} lacks {header}"
    schema = {
        **documented["content"]["application/json"]["schema"],
        "components": document["components"],
    }
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(response.json())


def _described_path(document: Document, path: str) -> str:
    """The path of the document that describes ``path`` (a query left out, a key filled in)."""
    path = path.partition("?")[0]
    described: str
    for described in document["paths"]:
        if re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", described), path):
            return described
    raise AssertionError(f"{path} is not described")


#: Requests covering every operation and every error a client can cause, with the
#: status each must get: (method, path, headers, JSON body, status).
_USER = {"Authorization": f"Bearer {TOKEN}"}
_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
_WRONG = {"Authorization": "Bearer wrong-token-0123456789abcdef"}
REQUESTS: list[tuple[str, str, dict[str, str], Any, int]] = [
    ("POST", "/api/command", _USER, {"command": "echo one"}, 200),
    ("POST", "/api/command", _USER, {"command": "echo one"}, 200),
    ("POST", "/api/command", _USER, {"command": "true", "use_cache": False, "ttl": 5}, 200),
    ("POST", "/api/command", _USER, {"command": "echo 'slow'", "timeout": 0.001}, 200),
    ("POST", "/api/command", _USER, {"command": "id"}, 400),
    ("POST", "/api/command", _USER, {"command": "echo a; id"}, 400),
    ("POST", "/api/command", _USER, {}, 400),
    ("POST", "/api/command", _USER, [1, 2], 400),
    ("POST", "/api/command", _USER, {"command": "true", "timeout": 10_000}, 400),
    ("POST", "/api/command", _USER, {"command": "echo " + "x" * 2048}, 413),
    ("POST", "/api/command", {}, {"command": "echo one"}, 401),
    ("POST", "/api/command", _WRONG, {"command": "echo one"}, 403),
    ("GET", "/api/command", _USER, None, 405),
    ("GET", "/api/cache/stats", _USER, None, 200),
    ("GET", "/api/cache/stats", {}, None, 401),
    ("GET", "/api/cache/stats", _WRONG, None, 403),
    ("GET", "/api/cache/history", _USER, None, 200),
    ("GET", "/api/cache/history", {}, None, 401),
    ("GET", "/api/telemetry", _USER, None, 200),
    ("GET", "/api/telemetry", {}, None, 401),
    ("GET", "/api/pools", _USER, None, 200),
    ("GET", "/api/pools", {}, None, 401),
    ("GET", "/api/pools", _WRONG, None, 403),
    ("POST", "/api/cache/clear", _USER, None, 403),
    ("POST", "/api/cache/clear", {}, None, 401),
    ("POST", "/api/cache/clear", _ADMIN, None, 200),
    ("DELETE", "/api/cache/clear", _ADMIN, None, 405),
    ("GET", "/api/cache/entries", _USER, None, 200),
    ("GET", "/api/cache/entries?prefix=echo&limit=1", _USER, None, 200),
    ("GET", "/api/cache/entries?limit=0", _USER, None, 400),
    ("GET", "/api/cache/entries", {}, None, 401),
    ("GET", f"/api/cache/entries/{'0' * 64}", _USER, None, 404),
    ("GET", f"/api/cache/entries/{'0' * 64}/output", _USER, None, 404),
    ("DELETE", f"/api/cache/entries/{'0' * 64}", _USER, None, 403),
    ("DELETE", f"/api/cache/entries/{'0' * 64}", _ADMIN, None, 404),
    ("POST", f"/api/cache/entries/{'0' * 64}", _ADMIN, None, 405),
    ("POST", "/api/cache/invalidate", _USER, {"prefix": "echo "}, 403),
    ("POST", "/api/cache/invalidate", _ADMIN, {"prefix": "echo ", "glob": "*"}, 400),
    ("POST", "/api/cache/invalidate", _ADMIN, {"glob": "echo *"}, 200),
    ("GET", "/health", {}, None, 200),
    ("POST", "/health", {}, None, 405),
    ("GET", "/livez", {}, None, 200),
    ("GET", "/openapi.json", {}, None, 200),
]


def test_live_responses_match_the_document(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(
        "--allow",
        "echo,true",
        "--max-body-bytes",
        "1024",
        env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN},
    )
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    with requests.Session() as session:
        for method, path, headers, body, status in REQUESTS:
            response = session.request(
                method, server.url + path, headers=headers, json=body, timeout=30
            )
            assert response.status_code == status, (method, path, body, response.text)
            _check(document, method, path, response)
        stored = session.post(
            f"{server.url}/api/command", headers=_USER, timeout=30, json={"command": "echo stored"}
        ).json()["cache_key"]
        for method, path, headers in (
            ("GET", f"/api/cache/entries/{stored}", _USER),
            ("GET", f"/api/cache/entries/{stored}/output", _USER),
            ("GET", "/api/cache/entries?prefix=echo", _USER),
            ("DELETE", f"/api/cache/entries/{stored}", _ADMIN),
        ):
            response = session.request(method, server.url + path, headers=headers, timeout=30)
            assert response.status_code == 200, (method, path, response.text)
            _check(document, method, path, response)
        missing = session.get(f"{server.url}/no/such/path", timeout=10)
    assert missing.status_code == 404
    error = {**document["components"]["schemas"]["Error"]}
    Draft202012Validator(error).validate(missing.json())


@pytest.mark.parametrize("status", ["400", "401", "403", "404", "405", "413", "503"])
def test_every_error_status_is_the_json_error(client: TestClient, status: str) -> None:
    document = client.get("/openapi.json").json()
    names = {
        "400": "BadRequest",
        "401": "Unauthorized",
        "403": "Forbidden",
        "404": "NotFound",
        "405": "MethodNotAllowed",
        "413": "TooLarge",
        "503": "Unavailable",
    }
    response = document["components"]["responses"][names[status]]
    assert response["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
