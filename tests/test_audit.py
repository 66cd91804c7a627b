"""The audit log (``--audit-log``) and the server log's formats, on real servers."""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import requests

from runcache.client.local import LocalClient
from runcache.config import Config
from runcache.engine.audit import KEPT_FILES, AuditLog, result_summary
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine, Outcome
from runcache.errors import BadRequest
from test_mcp import call, drive, http_session

from conftest import LiveServer, until

TOKEN, ADMIN = "t0ken-" + "x" * 26, "adm1n-" + "y" * 26

#: What a command prints in the secrecy test: it must reach neither log.
SECRET_OUTPUT = "sk-live-0123456789abcdefSECRET"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def post(server: LiveServer, path: str, token: str | None = None, **body: object) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = requests.post(server.url + path, json=body, headers=headers, timeout=30)
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def test_runs_hits_shared_runs_jobs_and_removals_each_get_their_line(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    server = live_server_factory("--audit-log", str(audit))
    ran = post(server, "/api/command", command="printf 'héllo\\n\\tx'")
    post(server, "/api/command", command="printf 'héllo\\n\\tx'")
    pair: list[dict[str, Any]] = []
    askers = [
        threading.Thread(
            target=lambda: pair.append(post(server, "/api/command", command="sleep 0.5; echo pair"))
        )
        for _ in range(2)
    ]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    job = post(server, "/api/command", command="sleep 0.2; exit 3", background=True)
    until(lambda: audit.exists() and "exit 3" in audit.read_text())
    post(server, "/api/command", command="echo other", scope="team-a")
    deleted = requests.delete(f"{server.url}/api/cache/entries/{ran['cache_key']}", timeout=10)
    assert deleted.status_code == 200
    post(server, "/api/cache/invalidate", glob="sleep * pair")
    post(server, "/api/cache/invalidate", scope="team-a", prefix="echo")
    post(server, "/api/cache/clear")

    # A turn's lines are written when the turn ends, which may be after its answers went.
    until(lambda: audit.read_text().count("\n") >= 10)
    records = lines(audit)
    assert [record["action"] for record in records] == (
        ["command"] * 6 + ["delete", "invalidate", "invalidate", "clear"]
    )
    run, hit, *shared, background, other = records[:6]
    for record in records:
        assert record["client"] == "127.0.0.1" and record["credential"] == "anonymous"
        assert record["time"].endswith("Z") and "T" in record["time"]
    assert run["command"] == "printf 'héllo\\n\\tx'" and run["cache_key"] == ran["cache_key"]
    assert (run["cached"], run["coalesced"], run["stale"], run["background"]) == (
        False,
        False,
        False,
        False,
    )
    assert run["return_code"] == 0 and run["output_bytes"] == len("héllo\n\tx".encode())
    assert run["execution_time"] == ran["execution_time"]
    assert hit["cached"] is True and hit["output_bytes"] == run["output_bytes"]
    assert sorted(record["coalesced"] for record in shared) == [False, True]
    assert all(record["output_bytes"] == 5 for record in shared)
    assert background["background"] is True and background["job_id"] == job["job_id"]
    assert background["return_code"] == 3 and background["output_bytes"] == 0
    assert other["command"] == "echo other" and "scope" not in other  # a run's line: no scope
    delete, invalidate, by_scope, clear = records[6:]
    assert delete["cache_key"] == ran["cache_key"] and delete["deleted"] == 1
    assert invalidate["glob"] == "sleep * pair" and invalidate["deleted"] == 1
    assert "scope" not in invalidate
    assert (by_scope["scope"], by_scope["prefix"], by_scope["deleted"]) == ("team-a", "echo", 1)
    assert clear["deleted"] is None


def test_the_credential_is_named_never_the_token_and_no_output_reaches_a_log(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    env = {"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN}
    server = live_server_factory("--audit-log", str(audit), "--log-level", "DEBUG", env=env)
    # The command prints the secret on both streams without holding it.
    printed = f"{SECRET_OUTPUT[:8]}''{SECRET_OUTPUT[8:]}"
    command = f"echo {printed}; echo {printed} >&2"
    post(server, "/api/command", TOKEN, command=command)
    post(server, "/api/command", ADMIN, command=command)
    post(server, "/api/command", TOKEN, command="exit 1", background=True)
    refused = requests.post(
        server.url + "/api/command",
        json={"command": "true"},
        headers={"Authorization": "Bearer wrong-" + TOKEN},
        timeout=10,
    )
    assert refused.status_code == 403

    async def over_mcp() -> None:
        async with http_session(server.url, TOKEN) as session:
            ran = await call(session, "execute_command", command="echo over mcp")
            assert ran["stdout"] == "over mcp\n"

    anyio.run(over_mcp)
    post(server, "/api/cache/clear", ADMIN)
    until(lambda: audit.read_text().count("\n") == 5)

    records = lines(audit)
    assert [(record["credential"], record.get("command")) for record in records] == [
        ("token", command),
        ("admin", command),
        ("token", "exit 1"),
        ("token", "echo over mcp"),
        ("admin", None),
    ]
    assert records[3]["background"] is True and records[3]["output_bytes"] == 9
    assert records[0]["output_bytes"] == 2 * (len(SECRET_OUTPUT) + 1)
    server.stop()
    server_log = "".join(server.output)
    assert ' ran "echo' in server_log and ' hit "echo' in server_log  # the lines are there
    for text in (server_log, audit.read_text()):
        for secret in (TOKEN, ADMIN, SECRET_OUTPUT):
            assert secret not in text


def test_rotation_keeps_five_files_and_splits_or_loses_no_line(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    limit = 4096
    server = live_server_factory(
        "--audit-log",
        str(audit),
        "--audit-log-max-bytes",
        str(limit),
        "--workers",
        "2",
        "--store",
        f"sqlite:///{tmp_path}/cache.db",
        "--log-level",
        "WARNING",
    )

    def files() -> list[Path]:
        return sorted(tmp_path.glob("audit.log*"))

    def send(commands: list[str]) -> None:
        with requests.Session() as session:
            for command in commands:
                answer = session.post(
                    server.url + "/api/command", json={"command": command}, timeout=30
                )
                assert answer.status_code == 200

    def in_parallel(count: int, start: int) -> None:
        senders = [
            threading.Thread(
                target=send, args=([f"echo {n % 7}" for n in range(start + i, start + count, 8)],)
            )
            for i in range(8)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()

    def kept() -> list[dict[str, Any]]:
        logs = [path for path in files() if not path.name.endswith(".lock")]
        return [record for path in logs for record in lines(path)]

    in_parallel(40, 0)  # about 400 bytes a line: 40 lines fill four files, all kept
    # A line is written at most a turn of the server's loop after its answer.
    until(lambda: len(kept()) == 40 or None, what="40 audit lines")
    assert len(kept()) == 40 and len(files()) >= 4
    in_parallel(200, 40)
    server.stop()  # what the servers kept is written as they stop
    logs = [path.name for path in files() if not path.name.endswith(".lock")]
    assert logs == ["audit.log", *(f"audit.log.{n}" for n in range(1, KEPT_FILES + 1))]
    for name in logs:
        text = (tmp_path / name).read_text()
        assert text.endswith("\n") and len(lines(tmp_path / name)) > 0  # whole lines only
        assert len(text.encode()) <= limit + 600  # one line past, at most, in a race


def test_json_server_log_for_start_a_run_and_an_error(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    server = live_server_factory(
        "--log-format", "json", "--audit-log", str(directory / "audit.log")
    )
    post(server, "/api/command", command="echo 'quoted\"\nline'")
    shutil.rmtree(directory)  # the audit log cannot be written: an ERROR line
    post(server, "/api/command", command="echo again")
    server.stop()
    entries = [
        orjson.loads(line)
        for line in server.output
        if not line.startswith("runcache listening on ")
    ]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    start = next(entry for entry in entries if entry["message"].startswith("runcache serving"))
    assert start["level"] == "INFO" and start["url"] == server.url
    run = next(entry for entry in entries if entry.get("command") == "echo 'quoted\"\nline'")
    assert run["client"] == "127.0.0.1" and run["return_code"] == 0
    error = next(entry for entry in entries if entry["level"] == "ERROR")
    assert error["logger"] == "runcache.engine.audit" and "cannot write" in error["message"]


@pytest.mark.parametrize(
    "args", [["--log-format", "xml"], ["--audit-log", "/nonexistent/dir/audit.log"]]
)
def test_bad_log_settings_are_refused_at_start_with_one_line(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("runcache: ")


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "plain",
        "line\nnext\n",
        'quote " and \\ backslash',
        "\\u0041 literal",
        "nul \x00 bell \x07",
        "héllo wörld ✓ 🎉",
        "\\\\\\n",
        "x" * 300_000,
    ],
)
def test_the_summary_counts_output_bytes_without_decoding_it(stdout: str) -> None:
    body = orjson.dumps(
        {"return_code": 2, "execution_time": 0.5, "stdout": stdout, "stderr": stdout[::-1]}
    )
    assert result_summary(body) == (2, 0.5, 2 * len(stdout.encode()))


def test_a_stale_answer_says_so(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    server = live_server_factory("--audit-log", str(audit))
    post(server, "/api/command", command="echo aging", ttl=0.3)
    time.sleep(0.5)
    answer = post(server, "/api/command", command="echo aging", ttl=0.3, stale=60)
    assert answer["stale"] is True
    until(lambda: audit.read_text().count("\n") >= 2)
    run, stale = lines(audit)[:2]
    assert (run["cached"], run["stale"]) == (False, False)
    assert (stale["cached"], stale["stale"], stale["output_bytes"]) == (True, True, 6)
    assert len(lines(audit)) == 2  # the refresh it started is no request: no line


def test_runcache_mcp_on_stdio_audits_its_runs_and_logs_json(tmp_path: Path) -> None:
    audit, log = tmp_path / "audit.log", tmp_path / "mcp.log"
    env = {"RUNCACHE_AUDIT_LOG": str(audit), "RUNCACHE_LOG_FORMAT": "json"}

    async def scenario(session: Any) -> None:
        assert (await call(session, "execute_command", command="echo stdio"))["stdout"] == (
            "stdio\n"
        )

    drive([], log, scenario, env)
    [record] = lines(audit)
    assert (record["client"], record["credential"], record["command"]) == (
        "stdio",
        "anonymous",
        "echo stdio",
    )
    entries = [orjson.loads(line) for line in log.read_text().splitlines()]
    assert any(entry.get("command") == "echo stdio" for entry in entries)


def test_refused_requests_are_audited_with_the_error(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    server = live_server_factory("--audit-log", str(audit), "--allow", "echo")
    refused = requests.post(
        server.url + "/api/command", json={"command": "rm -rf /tmp/x"}, timeout=10
    )
    too_long = requests.post(
        server.url + "/api/command", json={"command": "echo hi", "timeout": 10**6}, timeout=10
    )
    assert refused.status_code == too_long.status_code == 400
    until(lambda: audit.exists() and audit.read_text().count("\n") >= 2)
    first, second = lines(audit)
    assert first["command"] == "rm -rf /tmp/x" and first["error"] == refused.json()["error"]
    assert first["cache_key"] is None and first["return_code"] is None
    assert second["command"] == "echo hi" and "timeout" in second["error"]


def test_a_refused_command_writes_the_same_line_whichever_way_it_came_in(
    live_server_factory: Callable[..., LiveServer],
    tmp_path: Path,
) -> None:
    """The engine's one door audits: the command route, execute-async, MCP and the
    in-process client each write the refusal's line, and the same line."""
    audit = tmp_path / "audit.log"
    server = live_server_factory("--audit-log", str(audit), "--allow", "echo")
    refused = "rm -rf /tmp/runcache-never"
    for path in ("/api/command", "/api/process/execute-async"):
        answer = requests.post(server.url + path, json={"command": refused}, timeout=10)
        assert answer.status_code == 400, answer.text

    async def over_mcp() -> None:
        async with http_session(server.url) as session:
            result = await session.call_tool("start_command", {"command": refused})
            assert result.is_error

    anyio.run(over_mcp)
    config = Config.load(environ={"RUNCACHE_AUDIT_LOG": str(audit), "RUNCACHE_ALLOW": "echo"})
    with LocalClient(Engine.from_config(config)) as local, pytest.raises(BadRequest):
        local.execute(refused)

    until(lambda: audit.read_text().count("\n") >= 4)
    records = lines(audit)
    assert len(records) == 4
    assert [record.pop("client") for record in records] == ["127.0.0.1"] * 3 + ["local"]
    for record in records:
        del record["time"]
    assert records[0]["command"] == refused and "not an allowed executable" in records[0]["error"]
    assert records == [records[0]] * 4


def _answer(return_code: int, stdout: str) -> Outcome:
    return Outcome(
        orjson.dumps(
            {"return_code": return_code, "execution_time": 0.25, "stdout": stdout, "stderr": ""}
        ),
        cached=True,
    )


def test_a_turn_of_the_loop_writes_its_lines_together_and_close_writes_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"

    async def answer_three_then_clear() -> tuple[bytes, list[dict[str, Any]]]:
        log = AuditLog(str(path))
        same = _answer(0, "ok\n")
        for outcome in (same, _answer(1, "ok\n"), same):  # 2nd: same size, another code
            log.answered(Caller("10.0.0.7", "token"), "make test", "k" * 64, outcome)
        before_the_turn_ends = path.read_bytes()
        await asyncio.sleep(0)
        after = lines(path)
        log.removed(Caller("10.0.0.8", "admin"), "clear", None)
        log.close()  # in the same turn: close writes what it kept
        return before_the_turn_ends, after

    started = time.time()
    before, answered = asyncio.run(answer_three_then_clear())
    assert before == b""
    assert [
        (record["return_code"], record["output_bytes"], record["credential"]) for record in answered
    ] == [(0, 3, "token"), (1, 3, "token"), (0, 3, "token")]
    *_, cleared = lines(path)
    assert (cleared["action"], cleared["client"], cleared["credential"]) == (
        "clear",
        "10.0.0.8",
        "admin",
    )
    for record in lines(path):
        assert list(record)[0] == "time" and record["time"].endswith("Z")
        written = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert started - 1 <= written.timestamp() <= time.time() + 1


def test_outside_an_event_loop_a_line_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    log.refused(Caller("10.0.0.9"), "rm -rf /", "'rm' is not allowed")
    assert lines(path)[0]["error"] == "'rm' is not allowed"
    log.close()
