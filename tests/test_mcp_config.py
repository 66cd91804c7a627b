"""``runcache mcp-config``: each agent's snippet, started or reached as the agent would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import LiveServer

CLIENTS = ("claude-desktop", "claude-code", "vscode", "cursor")

#: The console script pip installed beside this Python.
RUNCACHE = Path(sys.executable).with_name("runcache")

#: Each client's reference to an environment variable, as its documentation writes it.
VARIABLE = re.compile(r"\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)\}")

TOKEN = "m" * 32


def _config(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The snippet ``runcache mcp-config ARGS`` prints on stdout, and its stderr."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    done = subprocess.run(
        [str(RUNCACHE), "mcp-config", *args],
        capture_output=True,
        env={**environment, **(env or {})},
        timeout=60,
        check=True,
    )
    return orjson.loads(done.stdout), done.stderr.decode()


def _entry(snippet: dict[str, Any], client: str) -> dict[str, Any]:
    servers = snippet["servers" if client == "vscode" else "mcpServers"]
    assert list(servers) == ["runcache"]
    entry: dict[str, Any] = servers["runcache"]
    return entry


def _expand(text: str, environ: dict[str, str]) -> str:
    """What the agent makes of a value: each variable reference replaced by its value."""
    return VARIABLE.sub(lambda match: environ[match[1]], text)


async def _tools(session: ClientSession) -> set[str]:
    await session.initialize()
    return {tool.name for tool in (await session.list_tools()).tools}


def _started(entry: dict[str, Any], tmp_path: Path, environ: dict[str, str]) -> set[str]:
    """The tools of the server the entry starts, started as an agent starts it: from
    another directory, with a PATH that does not hold this install."""
    params = StdioServerParameters(
        command=entry["command"],
        args=entry["args"],
        cwd=str(tmp_path),
        env={
            "PATH": "/usr/bin:/bin",
            **{name: _expand(value, environ) for name, value in entry.get("env", {}).items()},
        },
    )

    async def main() -> set[str]:
        with (tmp_path / "mcp.log").open("w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    return await _tools(session)

    return anyio.run(main)


def _reached(entry: dict[str, Any], environ: dict[str, str]) -> set[str]:
    """The tools at the entry's URL, with its headers as the agent expands them."""
    headers = {name: _expand(value, environ) for name, value in entry.get("headers", {}).items()}

    async def main() -> set[str]:
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(entry["url"], http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    return await _tools(session)

    return anyio.run(main)


@pytest.mark.parametrize("client", CLIENTS)
def test_the_stdio_snippet_starts_this_install_by_its_absolute_path(
    client: str, tmp_path: Path
) -> None:
    snippet, stderr = _config(client)
    entry = _entry(snippet, client)
    assert os.path.isabs(entry["command"]) and entry["args"][-1] == "mcp"
    assert entry.get("type", "stdio") == "stdio" and "env" not in entry
    assert "execute_command" in _started(entry, tmp_path, {})
    assert stderr.startswith("runcache: put this in ")


@pytest.mark.parametrize("client", ["claude-code", "vscode", "cursor"])
def test_the_http_snippet_reaches_mcp_with_the_token_of_a_variable_never_the_token(
    client: str, live_server_factory: Callable[..., LiveServer]
) -> None:
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN})
    snippet, _ = _config(client, "--url", server.url, env={"RUNCACHE_TOKEN": TOKEN})
    assert TOKEN not in orjson.dumps(snippet).decode()
    entry = _entry(snippet, client)
    assert entry["url"] == f"{server.url}/mcp"
    assert "execute_command" in _reached(entry, {"RUNCACHE_TOKEN": TOKEN})
    other, _ = _config(client, "--url", server.url, "--token-env", "AGENT_TOKEN")
    assert "execute_command" in _reached(_entry(other, client), {"AGENT_TOKEN": TOKEN})
    bare, _ = _config(client, "--url", server.url, "--no-token")
    assert "headers" not in _entry(bare, client)


@pytest.mark.parametrize("client", ["claude-desktop", "claude-code"])
def test_the_forwarding_snippet_starts_the_adapter_for_the_server(
    client: str, live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """``--server``, and Claude Desktop's ``--url`` (its file takes no URL), start
    ``runcache mcp --server``, which takes the token from its environment."""
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN})
    option = "--url" if client == "claude-desktop" else "--server"
    snippet, stderr = _config(client, option, server.url, env={"RUNCACHE_TOKEN": TOKEN})
    assert TOKEN not in orjson.dumps(snippet).decode()
    entry = _entry(snippet, client)
    assert entry["args"][-3:] == ["mcp", "--server", server.url]
    if client == "claude-desktop":  # nothing expands there: the agent's environment must hold it
        assert "env" not in entry and "RUNCACHE_TOKEN in its environment" in stderr
        entry = {**entry, "env": {"RUNCACHE_TOKEN": TOKEN}}
    assert "execute_command" in _started(entry, tmp_path, {"RUNCACHE_TOKEN": TOKEN})
