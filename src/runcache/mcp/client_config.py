"""What an agent's configuration file needs to start or reach runcache's MCP server.

``runcache mcp-config CLIENT`` prints it, so the snippet names this install's own
executable by its absolute path (an app started from a desktop does not see the
PATH of a shell with a virtualenv active) and never holds a token: the HTTP form
reads it from an environment variable with the client's own expansion syntax.

Each client's format, as its documentation gives it (read 2026):

- Claude Desktop, ``claude_desktop_config.json``: a top-level ``mcpServers`` object of
  ``{"command", "args", "env"}`` entries; local (stdio) servers only, remote ones are
  added as connectors in the app (https://modelcontextprotocol.io/quickstart/user).
  The file expands no variables, so the HTTP form is the stdio adapter forwarding to
  the server, which reads ``RUNCACHE_TOKEN`` from the environment it is started with.
- Claude Code, ``.mcp.json`` at a project's root (``claude mcp add-json NAME JSON`` for
  the other scopes): ``mcpServers`` with ``"type": "stdio"`` (``command``, ``args``,
  ``env``) or ``"type": "http"`` (``url``, ``headers``); ``${VAR}`` is expanded in
  ``command``, ``args``, ``env``, ``url`` and ``headers``
  (https://code.claude.com/docs/en/mcp, "Environment variable expansion in .mcp.json").
- VS Code, ``.vscode/mcp.json``: a top-level ``servers`` object, each with ``type``
  ``stdio`` (``command``, ``args``, ``env``) or ``http`` (``url``, ``headers``), and the
  editor's variables such as ``${env:NAME}``
  (https://code.visualstudio.com/docs/copilot/reference/mcp-configuration).
- Cursor, ``.cursor/mcp.json`` (or ``~/.cursor/mcp.json``): ``mcpServers`` with
  ``command``/``args``/``env`` or ``url``/``headers``, ``${env:NAME}`` expanded
  (https://cursor.com/docs/mcp).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runcache.client.http import normalize_url

#: The MCP endpoint of ``runcache serve``.
MCP_PATH = "/mcp"


@dataclass(frozen=True)
class ClientFormat:
    """How one client's file lists servers and refers to an environment variable."""

    #: The top-level key that holds the servers.
    servers_key: str
    #: ``{name}`` becomes the variable's name; None: the file expands no variables.
    variable: str | None
    #: Whether an entry says its transport (``"type": "stdio"`` / ``"http"``).
    typed: bool
    #: Whether the file can name a server by URL (else the stdio adapter forwards).
    remote: bool
    #: Where the snippet goes, told on stderr so stdout stays the bare JSON.
    where: str


CLIENTS: dict[str, ClientFormat] = {
    "claude-desktop": ClientFormat(
        "mcpServers",
        None,
        typed=False,
        remote=False,
        where="claude_desktop_config.json (macOS: ~/Library/Application Support/Claude/,"
        " Windows: %APPDATA%\\Claude\\), then restart Claude Desktop",
    ),
    "claude-code": ClientFormat(
        "mcpServers",
        "${{{name}}}",
        typed=True,
        remote=True,
        where=".mcp.json at the project's root (or the runcache object to"
        " `claude mcp add-json runcache '<object>'`)",
    ),
    "vscode": ClientFormat(
        "servers",
        "${{env:{name}}}",
        typed=True,
        remote=True,
        where=".vscode/mcp.json (or the user mcp.json: MCP: Open User Configuration)",
    ),
    "cursor": ClientFormat(
        "mcpServers",
        "${{env:{name}}}",
        typed=False,
        remote=True,
        where=".cursor/mcp.json in the project (or ~/.cursor/mcp.json for every project)",
    ),
}


def runcache_command() -> list[str]:
    """This install's ``runcache``, absolute: the console script beside this Python (a
    virtualenv's ``bin``, not resolved through its symlink, which would leave the
    virtualenv), else this Python with ``-m runcache``."""
    python = Path(os.path.abspath(sys.executable))
    script = python.with_name("runcache")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "runcache"]


def snippet(
    client: str,
    server: str | None = None,
    url: str | None = None,
    token_env: str | None = "RUNCACHE_TOKEN",
    name: str = "runcache",
) -> dict[str, Any]:
    """The configuration ``client`` needs for runcache's MCP server, as JSON to print.

    With ``url`` the agent talks to ``runcache serve``'s ``/mcp`` itself, sending the
    token of ``token_env`` (None: no header); with ``server`` (or with ``url`` in a file
    that takes no URL) ``runcache mcp`` forwards to that server over stdio; with
    neither it runs an engine of its own.
    """
    form = CLIENTS[client]
    if url is not None and form.remote:
        entry: dict[str, Any] = {"url": normalize_url(url) + MCP_PATH}
        if form.typed:
            entry = {"type": "http", **entry}
        if token_env and form.variable:
            reference = form.variable.format(name=token_env)
            entry["headers"] = {"Authorization": f"Bearer {reference}"}
        return {form.servers_key: {name: entry}}
    forward = normalize_url(url) if url is not None else server
    command, *args = runcache_command()
    entry = {
        "command": command,
        "args": [*args, "mcp", *(["--server", forward] if forward else [])],
    }
    if form.typed:
        entry = {"type": "stdio", **entry}
    if forward and token_env and form.variable:  # pass the token on, by reference only
        entry["env"] = {"RUNCACHE_TOKEN": form.variable.format(name=token_env)}
    return {form.servers_key: {name: entry}}
