"""A run's context (cwd, env, stdin): checked, run in, and part of the cache key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.errors import ConfigError
from runcache.run.context import ContextRules, key_part
from runcache.run.runner import NO_CONTEXT, RunContext
from runcache.wire import RunRequest
from test_cli import runcache

from conftest import Json, LiveServer, json_object

SHOW = 'pwd; echo "A=$A"; cat'


def _post(client: TestClient, **body: object) -> Json:
    answer = client.post("/api/command", json={"command": SHOW, **body})
    assert answer.status_code == 200, answer.text
    return json_object(answer)


def test_the_same_command_in_two_directories_gives_two_results(
    client: TestClient, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first, second = _post(client, cwd=str(one)), _post(client, cwd=str(two))
    assert first["stdout"].splitlines()[0] == str(one)
    assert second["stdout"].splitlines()[0] == str(two)
    assert first["cache_key"] != second["cache_key"]
    again = _post(client, cwd=str(one))
    assert again["cached"] and again["stdout"] == first["stdout"]


def test_env_and_stdin_reach_the_command_and_keep_results_apart(client: TestClient) -> None:
    plain = _post(client)
    with_env = _post(client, env={"A": "1"})
    other_env = _post(client, env={"A": "2"})
    with_stdin = _post(client, stdin="line one\nline two\n")
    assert plain["stdout"].splitlines()[1:] == ["A="]  # stdin is empty: EOF at once
    assert with_env["stdout"].splitlines()[1] == "A=1"
    assert other_env["stdout"].splitlines()[1] == "A=2"
    assert with_stdin["stdout"].splitlines()[2:] == ["line one", "line two"]
    keys = {answer["cache_key"] for answer in (plain, with_env, other_env, with_stdin)}
    assert len(keys) == 4
    assert _post(client, env={"A": "2"})["cached"]
    assert _post(client, stdin="line one\nline two\n")["cached"]
    # Two different stdins are two results (not only stdin against none).
    other_stdin = _post(client, stdin="another line\n")
    assert not other_stdin["cached"] and other_stdin["stdout"].splitlines()[2:] == ["another line"]
    assert other_stdin["cache_key"] != with_stdin["cache_key"]
    # No context and an empty one are the same run, under the key a request always had.
    assert _post(client, env={}, stdin="")["cache_key"] == plain["cache_key"]


def test_a_large_stdin_is_fed_whole(client: TestClient) -> None:
    text = "x" * (900 << 10)  # past any pipe buffer, within the body limit
    answer = client.post("/api/command", json={"command": "wc -c", "stdin": text})
    assert answer.status_code == 200, answer.text
    assert answer.json()["stdout"].strip() == str(len(text))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"cwd": "relative/dir"}, 400, "cwd must be an absolute path"),
        ({"cwd": "/no/such/directory"}, 400, "is not an existing directory"),
        ({"cwd": "/etc/hostname"}, 400, "is not an existing directory"),
        ({"cwd": 5}, 400, "cwd must be a string"),
        ({"env": ["A=1"]}, 400, "env must be an object"),
        ({"env": {"1A": "x"}}, 400, "variable names"),
        ({"env": {"A": 1}}, 400, "variable names"),
        ({"env": {"A": "a\u0000b"}}, 400, "without NUL"),
        ({"stdin": ["text"]}, 400, "stdin must be a string"),
    ],
)
def test_bad_context_is_a_4xx_naming_the_field_and_runs_nothing(
    client: TestClient, body: Json, status: int, message: str
) -> None:
    answer = client.post("/api/command", json={"command": "echo ran", **body})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert client.get("/api/telemetry").json()["commands_executed"] == 0


def test_allow_cwd_confines_the_directory_links_followed(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    sibling = tmp_path / "root2"  # shares the root's name as a prefix, and is not inside it
    sibling.mkdir()
    client = client_factory(allow_cwd=str(root))
    assert _post(client, cwd=str(root / "inner"))["stdout"].startswith(str(root / "inner"))
    assert _post(client, cwd=str(root))["stdout"].startswith(str(root))
    for refused in (outside, sibling, root / "escape", root / ".." / "outside", Path("/")):
        answer = client.post("/api/command", json={"command": "pwd", "cwd": str(refused)})
        assert answer.status_code == 403, (refused, answer.text)
        assert "--allow-cwd" in answer.json()["error"]


def test_env_allow_names_the_only_variables_a_request_may_set(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(env_allow="PATH,A")
    assert _post(client, env={"A": "yes"})["stdout"].splitlines()[1] == "A=yes"
    answer = client.post(
        "/api/command", json={"command": "true", "env": {"A": "1", "LD_PRELOAD": "x", "B": "2"}}
    )
    assert answer.status_code == 403
    assert "not B, LD_PRELOAD" in answer.json()["error"]


def test_allowlist_mode_refuses_env_unless_env_allow_names_it(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(allow="echo")
    answer = client.post("/api/command", json={"command": "echo hi", "env": {"LD_PRELOAD": "x"}})
    assert answer.status_code == 403
    assert "--env-allow" in answer.json()["error"]
    # A cwd and stdin are fine: the program run is still the one allowed.
    assert (
        client.post(
            "/api/command", json={"command": "echo hi", "cwd": "/tmp", "stdin": "x"}
        ).status_code
        == 200
    )


def test_rules_and_key_part_on_their_own(tmp_path: Path) -> None:
    rules = ContextRules([str(tmp_path)], [], allowlist_mode=False)
    assert rules.check(RunRequest("true")) is NO_CONTEXT
    assert key_part(NO_CONTEXT) == b""
    context = rules.check(
        RunRequest("true", cwd=str(tmp_path), env={"B": "1", "A": "2"}, stdin="in")
    )
    assert context == RunContext(str(tmp_path), {"B": "1", "A": "2"}, b"in")
    # The order of env's names changes nothing.
    swapped = rules.check(
        RunRequest("true", cwd=str(tmp_path), env={"A": "2", "B": "1"}, stdin="in")
    )
    assert key_part(context) == key_part(swapped)


def test_allow_cwd_must_name_absolute_existing_directories(tmp_path: Path) -> None:
    for bad in ("relative", str(tmp_path / "missing"), f"{tmp_path},/no/such"):
        with pytest.raises(ConfigError, match="^RUNCACHE_ALLOW_CWD: "):
            Config.load(environ={"RUNCACHE_ALLOW_CWD": bad})
    assert Config.load(environ={"RUNCACHE_ALLOW_CWD": f"{tmp_path}, /tmp"}).cwd_roots == (
        str(tmp_path),
        "/tmp",
    )


def test_context_over_a_live_server_and_the_cli(live_server: LiveServer, tmp_path: Path) -> None:
    body = {"command": SHOW, "cwd": str(tmp_path), "env": {"A": "live"}, "stdin": "fed"}
    answer = requests.post(f"{live_server.url}/api/command", json=body, timeout=30).json()
    assert answer["stdout"] == f"{tmp_path}\nA=live\nfed"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("runcache")),
            "run",
            "--server",
            live_server.url,
            "--cwd",
            str(tmp_path),
            "--env",
            "A=live",
            "--stdin",
            "--",
            "sh",
            "-c",
            SHOW,
        ],
        input=b"fed",
        capture_output=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")},
    )
    assert (done.returncode, done.stdout) == (0, f"{tmp_path}\nA=live\nfed".encode()), done
    assert runcache("run", "--env", "nonsense", "--", "true").returncode == 2


def test_cli_cwd_is_made_absolute_here(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("runcache")), "run", "--cwd", ".", "--", "pwd"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")},
            "XDG_CACHE_HOME": str(tmp_path / "cache"),  # its own cache, not the user's
        },
    )
    assert (done.returncode, done.stdout) == (0, f"{tmp_path}\n".encode()), done
