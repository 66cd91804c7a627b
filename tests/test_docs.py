"""The documentation cannot drift: the site builds, and every console example runs.

``mkdocs build --strict`` builds docs/ into a temporary directory (a broken link, a missing
page in the navigation or an anchor that no heading makes fails it). Every ```console block
of README.md and of each page in docs/ is run here, a page at a time (pages in parallel),
against a live ``runcache serve`` started for that page: each ``$ `` line is a command, the
lines up to the next one its expected output (stdout and stderr together).

How a page's example reads, so that a reader sees a plain terminal:

- ``localhost:8888`` and ``127.0.0.1:8888`` are the page's server; the commands run in one
  ``bash`` per page (a variable set by one command is seen by the next), with
  ``RUNCACHE_URL`` naming that server and this environment's ``runcache`` first on PATH.
- ``$ runcache serve [FLAGS] &``, as a page's first command, starts the page's server with
  those flags; its output is compared with the server's listening line.
- Before comparing, ids, keys, times, pids and ports are masked on both sides (``MASKS``),
  ``…`` in the expected output matches any text, and an expected line that starts with one
  space after a line ending in ``,`` continues that line (long JSON wrapped for reading).

Blocks that cannot run here (installs, systemd, other machines) use ```sh and are not run.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import LiveServer, start_server

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Every page with console examples: the README and each page of the site that has some.
PAGES = [
    page
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    if "\n```console\n" in page.read_text()
]

#: Seconds one example command may take before its page fails.
COMMAND_SECONDS = 30.0

#: What varies from run to run, masked to ``…`` (or the documented port) on both sides.
MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r'"(cache_key|job_id|task_id|timestamp|instance)":\s*"[^"]*"'), r'"\1":"…"'),
    (
        re.compile(
            r'"(execution_time|created_at|expires_at|started_at|runtime|uptime|uptime_seconds'
            r'|pid|at|bytes|total_execution_time)":\s*[-0-9.e+]+'
        ),
        r'"\1":…',
    ),
    (re.compile(r"\b[0-9a-f]{64}\b|\b[0-9a-f]{32}\b"), "…"),
    (re.compile(r'"[^"\s]*/bin/runcache"'), '"…/bin/runcache"'),
    (re.compile(r"\b(?:localhost|127\.0\.0\.1):\d+"), "127.0.0.1:8888"),
]

_SERVE = re.compile(r"^runcache serve(?P<flags>( [^&]*?)?) &$")


@dataclass
class Example:
    """One ``$ `` command of a page and the output its page shows for it."""

    block: int
    command: str
    expected: str


def examples(page: Path) -> list[Example]:
    """The console examples of ``page``, in the order a reader meets them."""
    found: list[Example] = []
    blocks = re.findall(r"^```console\n(.*?)^```$", page.read_text(), re.MULTILINE | re.DOTALL)
    for number, block in enumerate(blocks, 1):
        lines = block.splitlines()
        assert lines and lines[0].startswith("$ "), f"{page.name} block {number}: no $ first"
        for line in lines:
            if line.startswith("$ "):
                found.append(Example(number, line[2:], ""))
            elif found[-1].expected == "" and found[-1].command.endswith("\\"):
                found[-1].command += "\n" + line
            else:
                found[-1].expected += line + "\n"
    return found


def _unwrap(expected: str) -> str:
    return re.sub(r",\n (?! )", ",", expected)


def _masked(text: str) -> str:
    for pattern, replacement in MASKS:
        text = pattern.sub(replacement, text)
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return "\n".join(lines).strip()


def matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` output is what the page shows, masks and ``…`` applied."""
    wanted = _masked(_unwrap(expected))
    pattern = ".*?".join(re.escape(part) for part in wanted.split("…"))
    return re.fullmatch(pattern, _masked(actual), re.DOTALL) is not None


class _Shell:
    """One ``bash`` a page's commands run in, in order; output read up to a marker line."""

    def __init__(self, server: LiveServer, cwd: Path) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
        environment["RUNCACHE_URL"] = server.url
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
        self.port = server.port
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
        )
        self.marker = f"--runcache-docs-{os.getpid()}-{id(self)}--"

    def run(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        local = re.sub(r"\b(?:localhost|127\.0\.0\.1):8888\b", f"127.0.0.1:{self.port}", command)
        script = f"{local}\nprintf '\\n%s\\n' {shlex.quote(self.marker)}\n"
        self.process.stdin.write(script.encode())
        self.process.stdin.flush()
        output = b""
        deadline = time.monotonic() + COMMAND_SECONDS
        end = f"\n{self.marker}\n".encode()
        while end not in output:
            left = deadline - time.monotonic()
            assert left > 0, f"{command!r} did not finish in {COMMAND_SECONDS} s: {output!r}"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"the shell ended during {command!r}: {output!r}"
                output += chunk
        return output[: output.index(end)].decode()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # a command of a failed page still running
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_console_example_runs_as_shown(page: Path, tmp_path: Path) -> None:
    shown = examples(page)
    first = _SERVE.match(shown[0].command) if shown else None
    server = start_server(*shlex.split(first.group("flags")) if first else ())
    shell = _Shell(server, tmp_path)
    try:
        if first is not None:
            listening = next(line for line in server.output if "listening on" in line)
            assert matches(shown[0].expected, listening), (shown[0].expected, listening)
            shown = shown[1:]
        for example in shown:
            assert not _SERVE.match(example.command), f"{page.name}: serve only as the first"
            actual = shell.run(example.command)
            assert matches(example.expected, actual), (
                f"{page.name}, block {example.block}: $ {example.command}\n"
                f"--- the page shows\n{example.expected}--- it printed\n{actual}"
            )
    finally:
        shell.close()
        server.stop()
    server.assert_quiet_log()


def test_the_comparison_sees_a_changed_value() -> None:
    """Masks hide what varies and nothing else: a changed field or value still fails."""
    shown = '{"return_code":0,"execution_time":1.5,\n "cache_key":"ab…","stdout":"Linux\\n"}\n'
    key = "c" * 64
    ran = f'{{"return_code":0,"execution_time":0.2,"cache_key":"{key}","stdout":"Linux\\n"}}'
    assert matches(shown, ran)
    assert not matches(shown, ran.replace("Linux", "Darwin"))
    assert not matches(shown, ran.replace('"return_code":0', '"return_code":1'))
    assert not matches(shown, ran.replace('"stdout"', '"cancelled":false,"stdout"'))


def test_every_page_is_in_the_navigation_and_the_site_builds(tmp_path: Path) -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f" {page.name}\n" in config, f"{page.name} is not in mkdocs.yml's nav"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
