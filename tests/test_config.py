"""The settings table: defaults, environment, overrides, validation, and the docs."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runcache.config import Config, Setting, settings
from runcache.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"
#: The one page with every setting's row (the settings table of the documentation site).
CONFIGURATION = README.parent / "docs" / "configuration.md"


def test_defaults_are_what_clients_expect() -> None:
    config = Config.load(environ={})
    assert (config.host, config.port) == ("127.0.0.1", 8888)
    assert (config.max_entries, config.default_ttl, config.default_timeout) == (1000, 3600, 300)
    assert config.max_bytes == 256 * 1024 * 1024 and config.max_body_bytes == 1024 * 1024
    assert config.max_output_bytes == 8 * 1024 * 1024 and config.store == "memory://"
    assert (config.workers, config.max_connections) == (1, 10000)
    assert (config.keepalive_timeout, config.header_timeout, config.body_timeout) == (5, 10, 30)


def test_environment_then_overrides() -> None:
    environ = {"RUNCACHE_PORT": "9000", "RUNCACHE_MAX_ENTRIES": "5", "RUNCACHE_DEFAULT_TTL": "2.5"}
    config = Config.load({"port": 9100, "host": None}, environ=environ)
    assert (config.port, config.max_entries, config.default_ttl) == (9100, 5, 2.5)
    assert config.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RUNCACHE_PORT": "eighty"}, "RUNCACHE_PORT must be a whole number"),
        ({"RUNCACHE_MAX_ENTRIES": "0"}, "^RUNCACHE_MAX_ENTRIES must be at least 1"),
        (
            {"RUNCACHE_DEFAULT_TIMEOUT": "99999"},
            "^RUNCACHE_DEFAULT_TIMEOUT must not exceed max_timeout",
        ),
        ({"RUNCACHE_LOG_LEVEL": "LOUD"}, "^RUNCACHE_LOG_LEVEL must be DEBUG"),
    ],
)
def test_bad_values_are_refused_with_the_reason(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=environ)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keepalive_timeout": 0}, "keepalive_timeout must be at least"),
        ({"header_timeout": 0}, "header_timeout must be at least"),
        ({"body_timeout": -1}, "body_timeout must be at least"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"workers": 0}, "workers must be at least 1"),
    ],
)
def test_server_settings_have_floors(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(settings, environ={})


def test_several_workers_need_a_shared_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        Config.load({"workers": 2}, environ={}, flags=True)
    message = refused.value.message
    assert message.startswith("--workers 2 needs a store the workers share")
    assert "set --store to sqlite://" in message
    assert "sqlite://" in message and "redis://" in message and "\n" not in message
    shared = Config.load({"workers": 2, "store": f"sqlite://{tmp_path / 'cache.db'}"}, environ={})
    assert shared.workers == 2
    assert Config.load({"workers": 1}, environ={}).store == "memory://"


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("On", True), ("0", False), ("no", False)]
)
def test_a_yes_or_no_setting_is_read_as_written(text: str, value: bool) -> None:
    assert Config.load(environ={"RUNCACHE_MCP_STATELESS": text}).mcp_stateless is value
    assert Config.load({"mcp_stateless": text}, environ={}).mcp_stateless is value


def test_a_yes_or_no_setting_refuses_anything_else() -> None:
    # bool("false") is True: a plain conversion would take every word as yes.
    with pytest.raises(ConfigError, match="RUNCACHE_MCP_STATELESS must be true or false"):
        Config.load(environ={"RUNCACHE_MCP_STATELESS": "maybe"})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        Config.load({"colour": "blue"}, environ={})


def test_every_setting_is_documented_in_the_configuration_page() -> None:
    text = CONFIGURATION.read_text()
    for setting in settings():
        flag = "—" if setting.secret else f"`{setting.flag}`"
        row = rf"^\| {flag} \| `{setting.env_var}` \| .+ \| {re.escape(setting.help)} \|$"
        assert re.search(row, text, re.MULTILINE), f"{CONFIGURATION.name}: no {setting.env_var}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    text = README.read_text()
    after = text.split("Install what the tests need", 1)[1]
    command = after.split("```sh\n", 1)[1].split("\n```", 1)[0]
    ci_script = (README.parent / ".ci" / "run").read_text().rstrip("\n").splitlines()
    assert ci_script[-1] == command


#: Every numeric setting of the table, so a new one is covered without a word here.
NUMERIC = [
    setting
    for setting in settings()
    if isinstance(setting.default, (int, float)) and not isinstance(setting.default, bool)
]


def _nonsense(setting: Setting) -> list[str]:
    values = ["nan", "inf", "-inf", "-1", "1e12"]
    if isinstance(setting.default, int):
        values.append("9" * 25)  # past any 64-bit integer: once a traceback at start
    minimum = next(
        field.metadata["minimum"]
        for field in dataclasses.fields(Config)
        if field.name == setting.name
    )
    if minimum is not None and minimum > 0:
        values.append("0")
    return values


@pytest.mark.parametrize("setting", NUMERIC, ids=lambda setting: setting.name)
def test_every_numeric_setting_refuses_nonsense_naming_itself(setting: Setting) -> None:
    for value in _nonsense(setting):
        with pytest.raises(ConfigError) as refused:
            Config.load(environ={setting.env_var: value})
        message = refused.value.message
        assert "\n" not in message, message
        assert message.startswith(setting.name) or message.startswith(setting.env_var), message


@pytest.mark.parametrize("setting", NUMERIC, ids=lambda setting: setting.name)
def test_serve_refuses_a_nan_or_infinite_setting_with_one_line(setting: Setting) -> None:
    """From the environment and from the flag: exit 2 and a line naming the setting, never a
    traceback: a flag's text is parsed by the settings table, as the environment's is."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    for extra_env, flag in (({setting.env_var: "nan"}, []), ({}, [setting.flag, "inf"])):
        done = subprocess.run(
            [sys.executable, "-m", "runcache", "serve", *flag],
            env={**environment, **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert any(name in last for name in (setting.name, setting.flag, setting.env_var)), last
        assert done.stderr.count("\n") == 1, done.stderr
