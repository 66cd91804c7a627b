"""The MCP tools through a client that is not ours: the official MCP Inspector's CLI
(npm ``@modelcontextprotocol/inspector``), over stdio and over Streamable HTTP.

The Inspector is installed into ``.npm-tools`` of the checkout, at the version pinned
here, the first time a test needs it: the only network use, to the npm registry. To
update it, change :data:`INSPECTOR_VERSION` (``npm view @modelcontextprotocol/inspector
versions`` lists them) and run these tests. Node and npm come from Debian (the README's
test command installs them where missing); without them the tests fail, never skip.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runcache.mcp.shapes import DEFAULT_TOOLS

from conftest import LiveServer

#: The Inspector's version, pinned (its 1.x and later need a newer Node than Debian's 20).
INSPECTOR_VERSION = "0.21.1"

_TOOLS_DIR = Path(__file__).resolve().parent.parent / ".npm-tools"
_INSPECTOR = _TOOLS_DIR / "node_modules" / ".bin" / "mcp-inspector"


@pytest.fixture(scope="session")
def inspector() -> Path:
    """The Inspector's command, installed once (a lock keeps test workers from racing)."""
    _TOOLS_DIR.mkdir(exist_ok=True)
    with (_TOOLS_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = _TOOLS_DIR / "node_modules" / "@modelcontextprotocol" / "inspector"
        installed = package / "package.json"
        if not installed.exists() or json.loads(installed.read_text())["version"] != (
            INSPECTOR_VERSION
        ):
            subprocess.run(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(_TOOLS_DIR),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"@modelcontextprotocol/inspector@{INSPECTOR_VERSION}",
                ],
                check=True,
                timeout=600,
            )
    return _INSPECTOR


def _inspect(inspector: Path, target: list[str], *method: str) -> Any:
    """What the Inspector's CLI prints for one request, as JSON."""
    done = subprocess.run(
        [str(inspector), "--cli", *target, *method],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _lists_and_calls(inspector: Path, target: list[str]) -> None:
    listed = _inspect(inspector, target, "--method", "tools/list")
    assert [tool["name"] for tool in listed["tools"]] == list(DEFAULT_TOOLS)
    ran = _inspect(
        inspector,
        target,
        "--method",
        "tools/call",
        "--tool-name",
        "execute_command",
        "--tool-arg",
        "command=echo inspected",
    )
    assert not ran.get("isError") and ran["structuredContent"]["stdout"] == "inspected\n"
    job_id = ran["structuredContent"]["job_id"]
    links = [item["uri"] for item in ran["content"] if item["type"] == "resource_link"]
    assert links == [f"runcache://jobs/{job_id}/stdout", f"runcache://jobs/{job_id}/stderr"]
    refused = _inspect(
        inspector, target, "--method", "tools/call", "--tool-name", "execute_command"
    )
    assert refused["isError"] is True
    assert refused["content"] == [{"type": "text", "text": "Command parameter is required"}]


def test_the_inspector_lists_and_calls_the_tools_over_stdio(
    inspector: Path, tmp_path: Path
) -> None:
    _lists_and_calls(inspector, [sys.executable, "-m", "runcache", "mcp"])


def test_the_inspector_lists_and_calls_the_tools_over_http(
    inspector: Path, live_server_factory: Callable[..., LiveServer]
) -> None:
    server = live_server_factory()
    _lists_and_calls(inspector, [f"{server.url}/mcp", "--transport", "http"])
