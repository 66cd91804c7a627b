"""The browser guard (:mod:`runcache.web.origins`), in process: each rule, on each kind of route.

The same rules against a real server and a real Chromium are in ``test_browser_attacks.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.errors import ConfigError

#: One request of each kind the server answers: runs, clears, cancels, reads, streams,
#: MCP, metrics, the dashboard, health.
ROUTES = [
    ("POST", "/api/command"),
    ("POST", "/api/cache/clear"),
    ("POST", "/api/jobs/nope/cancel"),
    ("POST", "/api/processes/pause/1"),
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/nope/events"),
    ("GET", "/api/cache/entries"),
    ("POST", "/mcp"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/livez"),
    ("GET", "/openapi.json"),
]

#: What a page of http://evil.example sends with a fetch or a form.
FOREIGN_PAGE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}

#: What the dashboard, served by the server at http://127.0.0.1:8888/, sends.
DASHBOARD = {
    "Host": "127.0.0.1:8888",
    "Origin": "http://127.0.0.1:8888",
    "Sec-Fetch-Site": "same-origin",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Dest": "empty",
}


def _touch(path: Path) -> dict[str, object]:
    return {"command": f"touch {path}", "use_cache": False}


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9999", "Host": "127.0.0.1:8888"},  # another port
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Host": "evil.example:8888"},  # DNS rebinding: the attacker's name, our address
    ],
    ids=["origin", "null-origin", "other-port", "cross-site", "same-site", "rebinding"],
)
def test_a_foreign_page_is_refused_on_every_route(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.request(method, path, headers=headers, content=b"{}")
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    setting = (
        "--allowed-hosts" if "Host" in headers and "Origin" not in headers else "--allowed-origins"
    )
    assert setting in error, error


def test_the_refusals_say_why(client: TestClient) -> None:
    assert client.get("/api/jobs", headers={"Origin": "http://evil.example"}).json() == {
        "error": "cross-origin request refused: Origin http://evil.example is not allowed "
        "(--allowed-origins)"
    }
    assert client.get("/api/jobs", headers={"Host": "evil.example:8888"}).json() == {
        "error": "request refused: Host evil.example:8888 is not a name of this server "
        "(--allowed-hosts)"
    }
    assert client.get("/api/jobs", headers={"Sec-Fetch-Site": "cross-site"}).json() == {
        "error": "cross-site request refused: a page of another site sent it "
        "(Sec-Fetch-Site: cross-site); admit the page's origin with --allowed-origins"
    }


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},  # fetch, mode no-cors
        {
            "Origin": "http://evil.example",
            "Content-Type": "text/plain",  # a form, enctype text/plain
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "navigate",
            "Sec-Fetch-Dest": "iframe",
        },
        {"Host": "evil.example:8888", "Origin": "http://evil.example:8888"},  # rebinding
    ],
    ids=["no-cors-fetch", "form", "rebinding"],
)
def test_a_refused_command_does_not_run(
    client: TestClient, tmp_path: Path, headers: dict[str, str]
) -> None:
    ran = tmp_path / "ran"
    response = client.post("/api/command", json=_touch(ran), headers=headers)
    assert response.status_code == 403
    assert not ran.exists()
    assert client.get("/api/telemetry").json()["commands_executed"] == 0


def test_a_refused_clear_clears_nothing(client: TestClient) -> None:
    assert client.post("/api/command", json={"command": "echo kept"}).json()["success"]
    refused = client.post("/api/cache/clear", headers=FOREIGN_PAGE)
    assert refused.status_code == 403
    assert client.get("/api/cache/stats").json()["size"] == 1


def test_clients_without_origin_work_as_before(client: TestClient, tmp_path: Path) -> None:
    """curl, scripts and the reference's clients send no Origin and no Sec-Fetch-*."""
    ran = tmp_path / "ran"
    assert client.post("/api/command", json=_touch(ran)).json()["success"] is True
    assert ran.exists()
    # curl -d sends form-urlencoded: the body is still read as JSON, as today.
    curl = client.post(
        "/api/command",
        content=b'{"command": "echo curl"}',
        headers={"Content-Type": "application/x-www-form-urlencoded", "Host": "127.0.0.1:8888"},
    )
    assert curl.json()["stdout"] == "curl\n"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8888",
        "localhost:8888",
        "[::1]:8888",
        "LOCALHOST:8888",
        "127.0.0.1",
        "localhost:9000",
    ],
)
def test_the_dashboard_same_origin_is_admitted(
    client: TestClient, tmp_path: Path, host: str
) -> None:
    """Any port: a forwarded one (ssh -L 9000:127.0.0.1:8888) serves the dashboard too."""
    headers = {**DASHBOARD, "Host": host, "Origin": f"http://{host}"}
    ran = tmp_path / "ran"
    assert (
        client.get(
            "/",
            headers={
                **headers,
                "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Dest": "document",
                "Sec-Fetch-Site": "none",
            },
        ).status_code
        == 200
    )
    assert client.get("/api/jobs", headers=headers).status_code == 200
    assert client.post("/api/command", json=_touch(ran), headers=headers).status_code == 200
    assert ran.exists()


def test_a_link_from_another_site_opens_the_dashboard_page_only(client: TestClient) -> None:
    """A followed link is a top-level navigation: the static page, never framed nor data."""
    link = {
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
    }
    assert client.get("/", headers=link).status_code == 200
    assert client.get("/api/jobs", headers=link).status_code == 403
    assert client.post("/", headers=link).status_code == 403
    assert client.get("/", headers={**link, "Sec-Fetch-Dest": "iframe"}).status_code == 403
    assert client.get("/", headers={**link, "Origin": "http://evil.example"}).status_code == 403


def test_allowed_hosts_admit_a_proxy_name(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = client_factory(allowed_hosts="proxy.example, pinned.example:8443")
    for host in ("proxy.example", "proxy.example:443", "pinned.example:8443"):
        assert client.get("/api/jobs", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "pinned.example:9", "pinned.example"):
        assert client.get("/api/jobs", headers={"Host": host}).status_code == 403, host
    # A TLS proxy that keeps Host: the page's https origin is the server's own.
    ran = tmp_path / "ran"
    proxied = {
        "Host": "proxy.example",
        "Origin": "https://proxy.example",
        "Sec-Fetch-Site": "same-origin",
    }
    assert client.post("/api/command", json=_touch(ran), headers=proxied).status_code == 200
    assert ran.exists()


def test_allowed_origins_admit_another_site(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = client_factory(allowed_origins="https://ui.example,http://127.0.0.1:3000/")
    ran = tmp_path / "ran"
    for origin in ("https://ui.example", "http://127.0.0.1:3000", "HTTPS://UI.EXAMPLE"):
        headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site"}
        assert client.post("/api/command", json=_touch(ran), headers=headers).status_code == 200
    assert ran.exists()
    for origin in ("http://ui.example", "https://ui.example:8443", "http://127.0.0.1:3001"):
        assert client.get("/api/jobs", headers={"Origin": origin}).status_code == 403, origin


def test_an_allowed_origin_is_not_a_host(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(allowed_origins="https://ui.example")
    assert client.get("/api/jobs", headers={"Host": "ui.example"}).status_code == 403


@pytest.mark.parametrize("origins", ["ui.example", "https://ui.example/app", "ftp://ui.example"])
def test_an_allowed_origin_must_be_an_origin(origins: str) -> None:
    with pytest.raises(ConfigError, match="is not an origin such as"):
        Config.load({"allowed_origins": origins}, environ={})


def test_the_listening_name_is_admitted(client_factory: Callable[..., TestClient]) -> None:
    """A server listening on a name of its own (or on a LAN address) answers to it."""
    client = client_factory(host="runcache.lan", token="t" * 32)
    auth = {"Authorization": "Bearer " + "t" * 32}
    assert client.get("/api/jobs", headers={**auth, "Host": "runcache.lan:8888"}).is_success
    refused = client.get("/api/jobs", headers={**auth, "Host": "evil.example:8888"})
    assert refused.status_code == 403


def test_a_refusal_comes_before_the_token_and_is_logged_once(
    client_factory: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    token = "t" * 32
    client = client_factory(token=token)
    caplog.set_level(logging.WARNING)
    response = client.post(
        "/api/cache/clear",
        headers={"Authorization": f"Bearer {token}", "Origin": "http://evil.example\x1b[2J"},
    )
    assert response.status_code == 403 and "--allowed-origins" in response.json()["error"]
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1 and refusals[0].name == "runcache.web.origins"
    message = refusals[0].getMessage()
    assert "'http://evil.example\\x1b[2J'" in message and "\x1b" not in message  # as %r


def test_mcp_refuses_a_foreign_page_whatever_the_host(
    client_factory: Callable[..., TestClient],
) -> None:
    """The SDK's own check held only for --host 127.0.0.1, localhost or ::1; the guard
    holds for every --host, with the same JSON error as the API's."""
    client = client_factory(host="0.0.0.0", token="t" * 32)
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {
        "Authorization": "Bearer " + "t" * 32,
        "Accept": "application/json, text/event-stream",
    }
    refused = client.post("/mcp", json=initialize, headers={**headers, **FOREIGN_PAGE})
    assert refused.status_code == 403 and "--allowed-origins" in refused.json()["error"]
    admitted = client.post("/mcp", json=initialize, headers=headers)
    assert admitted.status_code == 200, admitted.text
