"""Allowlist mode: no shell, only the named executables, shell syntax refused by name."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.errors import ConfigError
from runcache.run.allowlist import shell_syntax

ClientFactory = Callable[..., TestClient]


@pytest.mark.parametrize(
    ("command", "offending"),
    [
        ("echo a; rm -rf /tmp/x", ";"),
        ("echo a && echo b", "&&"),
        ("echo a || true", "||"),
        ("echo a | cat", "|"),
        ("echo a &", "&"),
        ("echo $HOME", "$"),
        ("echo $(id)", "$("),
        ("echo `id`", "`"),
        ("echo a > /tmp/x", ">"),
        ("echo a >> /tmp/x", ">>"),
        ("cat < /etc/passwd", "<"),
        ("(echo a)", "("),
        ('echo "$HOME"', "$"),
        ('echo "`id`"', "`"),
        ("echo a\nrm x", "\n"),
    ],
)
def test_unquoted_shell_syntax_is_found_and_named(command: str, offending: str) -> None:
    assert shell_syntax(command) == offending


@pytest.mark.parametrize(
    "command",
    [
        "echo plain words",
        "echo 'a;b|c&d$e`f(g)h<i>j'",
        'echo "a;b|c&d(e)<f>"',
        r"echo a\;b \$HOME \&",
        "curl 'https://example.com/?a=1&b=2'",
        'echo "it\'s"',
    ],
)
def test_quoted_or_escaped_syntax_is_literal(command: str) -> None:
    assert shell_syntax(command) is None


def test_allowed_command_runs_without_a_shell(client_factory: ClientFactory) -> None:
    client = client_factory(allow="echo,true")
    response = client.post("/api/command", json={"command": "echo '$HOME;' \"a & b\" c\\;d"})
    assert response.status_code == 200
    assert response.json()["stdout"] == "$HOME; a & b c;d\n"


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("echo hi; id", "';'"),
        ("echo hi && id", "'&&'"),
        ("echo $(id)", "'$('"),
        ("echo `id`", "'`'"),
        ("echo hi > /tmp/runcache-allowlist-test", "'>'"),
    ],
)
def test_shell_syntax_is_refused_with_400_naming_it(
    client_factory: ClientFactory, command: str, named: str
) -> None:
    client = client_factory(allow="echo,true")
    response = client.post("/api/command", json={"command": command})
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"shell syntax {named} is not allowed")
    assert client.get("/api/telemetry").json()["commands_executed"] == 0


@pytest.mark.parametrize("command", ["id", "sh -c 'echo hi'", "FOO=1 echo hi", "'' hi"])
def test_executables_not_in_the_list_are_refused(
    client_factory: ClientFactory, command: str
) -> None:
    client = client_factory(allow="echo,true")
    response = client.post("/api/command", json={"command": command})
    assert response.status_code == 400
    assert "is not an allowed executable: allowed are echo, true" in response.json()["error"]


def test_a_path_runs_only_if_it_is_where_path_resolves_the_name(
    client_factory: ClientFactory,
) -> None:
    client = client_factory(allow="echo")
    resolved = shutil.which("echo")
    assert resolved is not None
    response = client.post("/api/command", json={"command": f"{resolved} by-path"})
    assert response.json()["stdout"] == "by-path\n"


def test_an_executable_elsewhere_with_an_allowed_name_is_refused(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    evil = tmp_path / "echo"
    evil.write_text('#!/bin/sh\ntouch "$0.ran"\n')
    evil.chmod(0o755)
    client = client_factory(allow="echo")
    for command in (str(evil), f"{tmp_path}/../{tmp_path.name}/echo", "./echo"):
        response = client.post("/api/command", json={"command": f"{command} hi"})
        assert response.status_code == 400, command
        assert "is not an allowed executable" in response.json()["error"]
    assert not (tmp_path / "echo.ran").exists()


def test_unbalanced_quotes_are_a_400(client_factory: ClientFactory) -> None:
    client = client_factory(allow="echo")
    response = client.post("/api/command", json={"command": "echo 'unclosed"})
    assert response.status_code == 400
    assert response.json()["error"] == (
        "command cannot be split into arguments: No closing quotation"
    )


def test_without_the_setting_the_shell_runs_commands(client: TestClient) -> None:
    response = client.post("/api/command", json={"command": "echo a; echo b | tr b c"})
    assert response.json()["stdout"] == "a\nc\n"


def test_cache_keys_differ_between_shell_and_allowlist_mode() -> None:
    shell = Engine.from_config(Config.load(environ={}))
    allowlist = Engine.from_config(Config.load({"allow": "echo"}, environ={}))
    try:
        assert shell.cache_key("echo hi") != allowlist.cache_key("echo hi")
    finally:
        shell.close()
        allowlist.close()


@pytest.mark.parametrize(
    ("allow", "message"),
    [
        ("echo,no-such-command-here", "no-such-command-here not found on PATH"),
        ("/usr/bin/echo", "allow takes executable names, not paths"),
    ],
)
def test_bad_allowlists_are_config_errors(allow: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Engine.from_config(Config.load({"allow": allow}, environ={}))


@pytest.mark.parametrize("runner", ["env", "find", "git", "sh", "python3", "xargs", "awk"])
def test_a_program_that_runs_programs_is_refused_unless_meant(runner: str) -> None:
    if shutil.which(runner) is None:
        pytest.fail(f"{runner} is not installed; the test needs it to resolve")
    with pytest.raises(ConfigError, match=f"allow: {runner} runs other programs"):
        Engine.from_config(Config.load({"allow": f"echo,{runner}"}, environ={}))
    meant = Engine.from_config(
        Config.load({"allow": f"echo,{runner}", "allow_runners": runner}, environ={})
    )
    meant.close()


def test_a_name_that_resolves_to_a_runner_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A harmless-looking name for a shell (a symlink) is judged by the file it runs."""
    (tmp_path / "lister").symlink_to(shutil.which("sh") or "/bin/sh")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="allow: lister runs other programs"):
        Engine.from_config(Config.load({"allow": "lister"}, environ={}))


def test_the_reported_allowlist_no_longer_starts() -> None:
    """``--allow echo,ls,find,env,git`` let ``env sh -c id``, ``find -exec sh`` and git
    aliases run a shell; now the server refuses it at start, with one line."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcache",
            "serve",
            "--port",
            "0",
            "--allow",
            "echo,ls,find,env,git",
        ],
        capture_output=True,
        timeout=60,
        check=False,
        text=True,
    )
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("runcache: --allow: env runs other programs")
    assert "--allow-runners" in done.stderr


# -- the environment commands see ----------------------------------------------------


def test_env_allow_passes_only_the_variables_named(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNCACHE_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("LANG", "C.UTF-8")
    client = client_factory(env_allow="PATH,LANG")
    stdout = client.post("/api/command", json={"command": "env"}).json()["stdout"]
    names = {line.split("=", 1)[0] for line in stdout.splitlines()}
    assert {"PATH", "LANG"} <= names
    assert "RUNCACHE_TEST_SECRET" not in names and "do-not-leak" not in stdout
    assert names - {"PATH", "LANG"} <= {"PWD"}  # the shell adds its working directory


def test_without_env_allow_commands_see_the_whole_environment_but_runcaches_own(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_VISIBLE", "seen")
    monkeypatch.setenv("RUNCACHE_TEST_HIDDEN", "hidden")
    client = client_factory()
    stdout = client.post("/api/command", json={"command": "env"}).json()["stdout"]
    assert "TEST_VISIBLE=seen" in stdout
    assert "RUNCACHE_TEST_HIDDEN" not in stdout and "hidden" not in stdout


def test_bad_env_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'A-B' is not an environment variable name"):
        Config.load({"env_allow": "PATH,A-B"}, environ={})
