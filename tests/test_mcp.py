"""The MCP tools, driven by the MCP SDK's own clients: ``runcache mcp`` as a real
subprocess on stdio (forwarding to a server, or with its own engine), and
``runcache serve``'s Streamable HTTP endpoint at ``/mcp``. Most tests ask for every
tool (``--mcp-tools all``); the default list has tests of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec
import orjson
import psutil
import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult, ResourceLink, TextContent, TextResourceContents

from runcache import wire
from runcache.mcp.shapes import (
    DEFAULT_TOOLS,
    MAX_RESULT_CHARS,
    ExecuteRequest,
    ExecuteResult,
    JobRef,
    OutputRequest,
    ProcessRef,
)
from runcache.mcp.tools import _lean_schema

from conftest import LiveServer, free_port, held

#: Each tool and the shape it answers with.
ANSWERS: dict[str, type[msgspec.Struct]] = {
    "execute_command": ExecuteResult,
    "start_command": wire.JobAccepted,
    "job_status": wire.JobDetail,
    "read_output": wire.JobOutput,
    "cancel_job": wire.JobAction,
    "get_cache_stats": wire.CacheStats,
    "clear_cache": wire.Cleared,
    "server_health": wire.Health,
    "get_telemetry": wire.Telemetry,
    "list_active_processes": wire.ProcessList,
    "get_process_status": wire.ProcessDetail,
    "terminate_process": wire.ProcessDone,
    "pause_process": wire.ProcessDone,
    "resume_process": wire.ProcessDone,
    "get_process_dashboard": wire.Dashboard,
}
#: Each tool that takes arguments and their shape.
REQUESTS: dict[str, type[msgspec.Struct]] = {
    "execute_command": ExecuteRequest,
    "start_command": wire.RunRequest,
    "job_status": JobRef,
    "read_output": OutputRequest,
    "cancel_job": JobRef,
    "get_process_status": ProcessRef,
    "terminate_process": ProcessRef,
    "pause_process": ProcessRef,
    "resume_process": ProcessRef,
}
TOOLS = set(ANSWERS)
ALL = ["--mcp-tools", "all"]

Scenario = Callable[[ClientSession], Awaitable[None]]
T = TypeVar("T")


@asynccontextmanager
async def mcp_session(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[ClientSession]:
    """Start ``runcache mcp`` with ``args`` (and ``env`` added) and a session to it."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "runcache", "mcp", *args],
        cwd=str(log.parent),
        env={**os.environ, **env} if env else None,
    )
    with log.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def drive(
    args: list[str], log: Path, scenario: Scenario, env: dict[str, str] | None = None
) -> None:
    """Run one scenario against a fresh ``runcache mcp`` process."""

    async def main() -> None:
        async with mcp_session(args, log, env) as session:
            await scenario(session)

    anyio.run(main)


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result, checked against the wire's
    schema of its answer (strictly: formats too), and the same JSON as its text."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, _text(result)
    structured: dict[str, Any] | None = result.structured_content
    assert structured is not None
    schema = wire.shape_schema(ANSWERS[tool])
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(structured)
    assert orjson.loads(_text(result)) == structured
    return structured


def _text(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


@pytest.fixture(params=["server", "in-process"])
def mcp_args(request: pytest.FixtureRequest) -> list[str]:
    """The adapter forwarding to a real server, and the adapter with its own engine."""
    if request.param == "server":
        server: LiveServer = request.getfixturevalue("live_server")
        return ["--server", server.url, *ALL]
    return ALL


@pytest.mark.parametrize(
    "shape",
    [
        shape
        for shape in dict.fromkeys([wire.CommandRequest, *ANSWERS.values()])
        if shape in wire.SHAPES
    ],
    ids=lambda shape: shape.__name__,
)
def test_a_tool_schema_is_the_openapi_component_with_its_references_inside(
    shape: type[msgspec.Struct],
) -> None:
    components = wire.schema_components(ref_template="#/$defs/{name}")
    schema = wire.shape_schema(shape)
    inside = schema.pop("$defs", {})
    assert schema == components[shape.__name__]
    assert inside == {name: components[name] for name in inside}


def _schema_texts(schema: Any) -> list[str]:
    """Every key and string of a schema, to look for what a lean schema leaves out."""
    if isinstance(schema, dict):
        return [text for key, value in schema.items() for text in [key, *_schema_texts(value)]]
    if isinstance(schema, list):
        return [text for item in schema for text in _schema_texts(item)]
    return [schema] if isinstance(schema, str) else []


def test_tools_list_the_wire_schemas_made_lean(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert tools.keys() == TOOLS
        for name, tool in tools.items():
            assert tool.description and tool.description.count(". ") <= 2, name
            assert "process group" not in tool.description or "PID namespace" in tool.description
            assert tool.output_schema is None, name  # the answers' shapes are the API's
            assert tool.meta == {"anthropic/maxResultSizeChars": MAX_RESULT_CHARS}, name
        for name, shape in REQUESTS.items():
            schema = tools[name].input_schema
            assert schema == _lean_schema(wire.shape_schema(shape)), name
            Draft202012Validator.check_schema(schema)
            assert not {"pattern", "title", "anyOf"} & set(_schema_texts(schema)), name
        execute = tools["execute_command"]
        assert execute.input_schema["required"] == ["command"]  # the rest optional
        assert set(execute.input_schema["properties"]) == set(
            msgspec.structs.asdict(ExecuteRequest(command="x"))
        )
        for name in TOOLS - set(REQUESTS):
            assert tools[name].input_schema["properties"] == {}, name
        hints = {name: tool.annotations for name, tool in tools.items()}
        assert all(
            (hint := hints[name]) and hint.read_only_hint
            for name in ("get_cache_stats", "server_health", "get_telemetry")
        )
        assert hints["clear_cache"] and hints["clear_cache"].idempotent_hint
        assert hints["execute_command"] and hints["execute_command"].open_world_hint

    drive(mcp_args, tmp_path / "mcp.log", scenario)


async def _listed(session: ClientSession) -> tuple[list[str], int]:
    """The names ``tools/list`` gives, and the size of its answer as JSON on the wire."""
    listed = await session.list_tools()
    size = len(listed.model_dump_json(by_alias=True, exclude_none=True).encode())
    return [tool.name for tool in listed.tools], size


def test_the_default_tool_list_is_small_and_more_come_when_named(tmp_path: Path) -> None:
    sizes: dict[str, int] = {}

    async def default(session: ClientSession) -> None:
        names, sizes["default"] = await _listed(session)
        assert names == list(DEFAULT_TOOLS)  # clear_cache too: the local user has the right
        hidden = await session.call_tool("get_process_dashboard", {})
        assert hidden.is_error and "Unknown tool" in _text(hidden)

    async def named(session: ClientSession) -> None:
        names, _ = await _listed(session)
        assert names == ["execute_command", "server_health"]

    async def every(session: ClientSession) -> None:
        names, sizes["all"] = await _listed(session)
        assert set(names) == TOOLS

    drive([], tmp_path / "mcp.log", default)
    drive(["--mcp-tools", "execute_command, server_health"], tmp_path / "mcp.log", named)
    drive([], tmp_path / "mcp.log", every, {"RUNCACHE_MCP_TOOLS": "all"})
    assert sizes["default"] <= 8 * 1024 < sizes["all"], sizes


def test_a_misspelt_tool_name_stops_the_start_naming_the_closest() -> None:
    mcp = subprocess.run(
        [sys.executable, "-m", "runcache", "mcp", "--mcp-tools", "default,job_stats"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert mcp.returncode != 0
    assert "no tool 'job_stats'; did you mean 'job_status'?" in mcp.stderr
    served = start_server_expecting_failure("--mcp-tools", "excute_command")
    assert "no tool 'excute_command'; did you mean 'execute_command'?" in served


def start_server_expecting_failure(*args: str) -> str:
    """What ``runcache serve`` with ``args`` says on its way out, refusing to start."""
    serve = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert serve.returncode != 0
    return serve.stderr


def test_tools_cache_stats_and_clear(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        first = await call(session, "execute_command", command="cat /proc/sys/kernel/random/uuid")
        second = await call(session, "execute_command", command="cat /proc/sys/kernel/random/uuid")
        assert (first["cached"], second["cached"]) == (False, True)
        assert second["stdout"] == first["stdout"] and first["return_code"] == 0
        stats = await call(session, "get_cache_stats")
        assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 1, "50.0%")
        fresh = await call(
            session, "execute_command", command="cat /proc/sys/kernel/random/uuid", use_cache=False
        )
        assert fresh["cached"] is False and fresh["stdout"] != first["stdout"]
        assert await call(session, "clear_cache") == {"success": True, "message": "Cache cleared"}
        stats = await call(session, "get_cache_stats")
        assert (stats["size"], stats["hits"], stats["misses"]) == (0, 0, 0)

    drive(mcp_args, tmp_path / "mcp.log", scenario)


def test_health_telemetry_and_a_failing_command(mcp_args: list[str], tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        failed = await call(session, "execute_command", command="echo oops >&2; exit 4")
        assert (failed["return_code"], failed["stderr"], failed["success"]) == (4, "oops\n", False)
        timed_out = await call(session, "execute_command", command="sleep 30", timeout=0.3)
        assert timed_out["timed_out"] is True
        health = await call(session, "server_health")
        assert health["status"] == "healthy" and health["cache_stats"]["size"] == 0
        telemetry = await call(session, "get_telemetry")
        assert telemetry["commands_executed"] == 2 and telemetry["success_rate"] == "0.0%"

    drive(mcp_args, tmp_path / "mcp.log", scenario)


#: Bad arguments and the HTTP API's message for each, answered as a tool error alone.
BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("execute_command", {}, "Command parameter is required"),
    ("execute_command", {"command": ""}, "Command parameter is required"),
    (
        "execute_command",
        {"command": "true", "timeout": 1e9},
        "timeout must be at most 3600 seconds",
    ),
    ("execute_command", {"command": "true", "ttl": 0}, "ttl must be greater than 0 seconds"),
    (
        "execute_command",
        {"command": "true", "timeout": "soon"},
        "timeout must be a number of seconds",
    ),
    ("execute_command", {"command": 5}, "command must be a string"),
    (
        "execute_command",
        {"command": "true", "env": "A=1"},
        "env must be an object of variable names to string values",
    ),
    (
        "execute_command",
        {"command": "true", "max_output_chars": -1},
        "max_output_chars must be 0 or more",
    ),
    (
        "execute_command",
        {"command": "true", "timeot": 0.1},
        "unknown field 'timeot'; did you mean 'timeout'?",
    ),
    (
        "start_command",
        {"command": "true", "timeot": 0.1},
        "unknown field 'timeot'; did you mean 'timeout'?",
    ),
    ("start_command", {"command": "true", "use_cache": "maybe"}, "use_cache must be true or false"),
    ("execute_command", {"command": "true", "scope": "team a"}, wire.SCOPE_RULE),
    ("start_command", {"command": "true", "scope": 5}, "scope must be a string"),
    (
        "execute_command",
        {"command": "true", "scop": "a"},
        "unknown field 'scop'; did you mean 'scope'?",
    ),
    ("job_status", {}, "job_id is required"),
    ("read_output", {"job_id": "x", "stream": "stdin"}, "stream must be stdout or stderr"),
    (
        "read_output",
        {"job_id": "x", "limit": 0},
        f"limit must be a whole number from 1 to {wire.MAX_PAGE_BYTES}",
    ),
    (
        "read_output",
        {"job_id": "x", "offset": "start"},
        f"offset must be a whole number from 0 to {wire.MAX_OFFSET}",
    ),
    ("get_process_status", {"pid": "one"}, "pid must be a whole number"),
    ("get_process_status", {}, "pid is required"),
]


def test_argument_errors_are_the_apis_messages_as_tool_errors(driver: Driver) -> None:
    async def scenario(session: ClientSession) -> None:
        for tool, arguments, message in BAD_ARGUMENTS:
            refused = await session.call_tool(tool, arguments)
            assert refused.is_error, (tool, arguments)
            assert _text(refused) == message, (tool, arguments)
        assert (await call(session, "execute_command", command="echo ok"))["stdout"] == "ok\n"

    driver(scenario)


def test_the_http_api_gives_the_same_messages(live_server: LiveServer) -> None:
    for tool, arguments, message in BAD_ARGUMENTS:
        if tool == "execute_command" and "max_output_chars" not in arguments:
            answer = requests.post(f"{live_server.url}/api/command", json=arguments, timeout=10)
            assert answer.status_code == 400 and answer.json()["error"] == message, arguments


def test_a_server_that_is_down_is_a_tool_error_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario(session: ClientSession) -> None:
        for tool, arguments in [("execute_command", {"command": "true"}), ("get_cache_stats", {})]:
            result = await session.call_tool(tool, arguments)
            assert result.is_error and f"cannot reach a runcache server at {url}" in _text(result)

    drive(["--server", url], tmp_path / "mcp.log", scenario)


def test_the_token_is_sent(live_server_factory: Callable[..., LiveServer], tmp_path: Path) -> None:
    token = "k" * 32
    server = live_server_factory(env={"RUNCACHE_TOKEN": token})

    async def scenario(session: ClientSession) -> None:
        assert (await call(session, "execute_command", command="echo hi"))["stdout"] == "hi\n"
        assert (await call(session, "clear_cache"))["success"] is True

    drive(["--server", server.url], tmp_path / "mcp.log", scenario, {"RUNCACHE_TOKEN": token})


def test_logs_go_to_stderr_and_hanging_up_kills_a_running_command(tmp_path: Path) -> None:
    log = tmp_path / "mcp.log"

    async def scenario(session: ClientSession) -> None:
        await call(session, "execute_command", command="echo hi")
        with anyio.move_on_after(0.5):
            await session.call_tool("execute_command", {"command": "sleep 60"})

    drive([], log, scenario)
    logged = log.read_text()
    assert "runcache MCP server on stdio" in logged and "ran 'echo hi'" in logged
    # Killed by the adapter closing its engine, not left for the client's kill of the tree.
    assert "ran 'sleep 60': exit -9" in logged


# -- long runs: progress, the head and tail cut, jobs and processes, cancelling ---------


@asynccontextmanager
async def http_session(url: str, token: str | None = None) -> AsyncIterator[ClientSession]:
    """A session with ``runcache serve``'s ``/mcp`` through the SDK's Streamable HTTP client."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(f"{url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


Driver = Callable[[Scenario], None]


@pytest.fixture(params=["server", "in-process", "http"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    """Run a scenario over each way the tools are served: stdio forwarding to a server,
    stdio with an engine of its own, and Streamable HTTP at a server's ``/mcp``."""
    if request.param == "http":
        factory: Callable[..., LiveServer] = request.getfixturevalue("live_server_factory")
        server = factory(env={"RUNCACHE_MCP_TOOLS": "all"})

        def over_http(scenario: Scenario) -> None:
            async def main() -> None:
                async with http_session(server.url) as session:
                    await scenario(session)

            anyio.run(main)

        return over_http
    args = (
        ["--server", request.getfixturevalue("live_server").url, *ALL]
        if request.param == "server"
        else ALL
    )
    return lambda scenario: drive(args, tmp_path / "mcp.log", scenario)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie waiting to be reaped is dead)."""
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


async def _until(probe: Callable[[], Awaitable[T | None]], seconds: float = 15.0) -> T:
    """The first truthy value ``probe`` returns, asked every 50 ms."""
    with anyio.fail_after(seconds):
        while not (value := await probe()):
            await anyio.sleep(0.05)
    return value


def test_execute_command_reports_progress_while_it_runs(driver: Driver) -> None:
    command = f"for i in 1 2 3 4 5; do echo line $i; sleep 1; done # {uuid.uuid4().hex}"
    reports: list[tuple[float, float | None, str | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    async def scenario(session: ClientSession) -> None:
        result = await session.call_tool(
            "execute_command", {"command": command, "timeout": 60}, progress_callback=progress
        )
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        assert result.structured_content["stdout"].count("line") == 5

    driver(scenario)
    assert len(reports) >= 2, reports  # one at least every 2 s over a run of 5 s
    values = [value for value, _, _ in reports]
    assert values == sorted(values) and len(set(values)) == len(values)  # always increasing
    assert all(total is None for _, total, _ in reports)  # how much it will print is unknown
    # The whole part is the bytes printed: "line N\n" is 7 bytes, and the last line the message.
    for value, _, message in reports:
        assert message and message.startswith("line "), reports
        assert int(value) == 7 * int(message.split()[1]), reports


def test_long_output_comes_back_as_head_and_tail_and_the_rest_can_be_read(
    driver: Driver,
) -> None:
    # Lines of numbers, and a multi-byte character in each, so character and byte counts differ.
    command = f"seq 1 30000 | sed 's/$/ é/' # {uuid.uuid4().hex}"
    whole = "".join(f"{n} é\n" for n in range(1, 30001))

    async def scenario(session: ClientSession) -> None:
        cut = await call(session, "execute_command", command=command, max_output_chars=1000)
        stdout = cut["stdout"]
        head, rest = stdout.split("\n[runcache: ", 1)
        note, tail = rest.split("]\n", 1)
        assert len(head) + len(tail) == 1000
        assert whole.startswith(head) and whole.endswith(tail)
        assert note.startswith(f"{len(whole) - 1000:,} characters")
        assert f'read_output(job_id="{cut["job_id"]}", stream="stdout", offset=' in note
        offset = int(note.split("offset=")[1].split(")")[0])
        end = int(note.rsplit("up to byte ", 1)[1])
        assert offset == len(head.encode())
        middle = b""
        while offset < end:
            page = await call(
                session,
                "read_output",
                job_id=cut["job_id"],
                offset=offset,
                limit=min(50_000, end - offset),
            )
            middle += page["data"].encode()
            offset = page["next_offset"]
        assert head + middle.decode() + tail == whole
        whole_answer = await call(session, "execute_command", command=command, max_output_chars=0)
        assert whole_answer["stdout"] == whole and whole_answer["cached"] is True
        short = await call(session, "execute_command", command="echo short")
        assert short["stdout"] == "short\n"  # under the default 20,000 characters: whole

    driver(scenario)


def test_results_link_the_whole_output_as_resources_read_in_pages(driver: Driver) -> None:
    command = f"seq 1 3000 | sed 's/$/ é/'; echo oops >&2 # {uuid.uuid4().hex}"
    whole = "".join(f"{n} é\n" for n in range(1, 3001))

    async def scenario(session: ClientSession) -> None:
        result = await session.call_tool(
            "execute_command", {"command": command, "max_output_chars": 100}
        )
        assert result.structured_content is not None
        job_id = result.structured_content["job_id"]
        links = [block for block in result.content if isinstance(block, ResourceLink)]
        assert [str(link.uri) for link in links] == [
            f"runcache://jobs/{job_id}/stdout",
            f"runcache://jobs/{job_id}/stderr",
        ]
        read = b""
        while True:  # pages of 1,000 bytes, each ending on a whole character
            page = await session.read_resource(f"{links[0].uri}?offset={len(read)}&limit=1000")
            (contents,) = page.contents
            assert isinstance(contents, TextResourceContents)
            if not contents.text:
                break
            assert len(contents.text.encode()) <= 1000
            read += contents.text.encode()
        assert read.decode() == whole
        (stderr,) = (await session.read_resource(str(links[1].uri))).contents
        assert isinstance(stderr, TextResourceContents) and stderr.text == "oops\n"
        paged = await session.call_tool("read_output", {"job_id": job_id, "limit": 10})
        assert [block.uri for block in paged.content if isinstance(block, ResourceLink)] == [
            link.uri for link in links
        ]
        with pytest.raises(Exception, match="no job 'nope'"):
            await session.read_resource("runcache://jobs/nope/stdout")
        with pytest.raises(Exception, match="stream must be stdout or stderr"):
            await session.read_resource(f"runcache://jobs/{job_id}/stdin")

    driver(scenario)


def test_jobs_tools_start_follow_read_and_cancel(driver: Driver) -> None:
    marker = uuid.uuid4().hex

    async def scenario(session: ClientSession) -> None:
        started = await call(
            session, "start_command", command=f"echo started {marker}; sleep 30 & sleep 30"
        )
        assert started["status"] == "running" and started["pid"]
        job_id = started["job_id"]

        async def printed() -> dict[str, Any] | None:
            page = await call(session, "read_output", job_id=job_id)
            return page if page["data"] else None

        page = await _until(printed)
        assert page["data"] == f"started {marker}\n" and page["eof"] is False
        status = await call(session, "job_status", job_id=job_id)
        assert status["status"] == "running" and status["last_output"] == f"started {marker}"
        cancelled = await call(session, "cancel_job", job_id=job_id)
        assert cancelled == {"success": True, "job_id": job_id, "status": "cancelled"}
        assert not _group_alive(started["pid"])
        ended = await call(session, "job_status", job_id=job_id)
        assert ended["result"]["cancelled"] is True and ended["result"]["success"] is False
        again = await session.call_tool("cancel_job", {"job_id": job_id})
        assert again.is_error and "has ended (cancelled)" in _text(again)
        unknown = await session.call_tool("job_status", {"job_id": "nope"})
        assert unknown.is_error and "no job 'nope'" in _text(unknown)
        bad = await session.call_tool("read_output", {"job_id": job_id, "stream": "stdin"})
        assert bad.is_error and "stream must be stdout or stderr" in _text(bad)
        # The page query is the API's (wire.PageQuery): its bounds and its messages.
        for argument, value, message in (
            (
                "offset",
                wire.MAX_OFFSET + 1,
                f"offset must be a whole number from 0 to {wire.MAX_OFFSET}",
            ),
            ("limit", 0, f"limit must be a whole number from 1 to {wire.MAX_PAGE_BYTES}"),
        ):
            refused = await session.call_tool("read_output", {"job_id": job_id, argument: value})
            assert refused.is_error and message in _text(refused), _text(refused)

    driver(scenario)


def test_process_tools_list_pause_resume_and_terminate(driver: Driver) -> None:
    marker = uuid.uuid4().hex

    async def scenario(session: ClientSession) -> None:
        started = await call(
            session, "start_command", command=f"sleep 30 & sleep 30 # {marker}", use_cache=False
        )
        pid = started["pid"]
        listed = await call(session, "list_active_processes")
        assert listed["active_processes"][str(pid)]["status"] == "running"
        status = await call(session, "get_process_status", pid=pid)
        assert status["process"]["command"].endswith(marker)
        group = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        assert (await call(session, "pause_process", pid=pid))["message"] == (
            f"Process {pid} paused successfully"
        )

        async def stopped() -> bool:
            return all(map(held, group))

        await _until(stopped)
        await call(session, "resume_process", pid=pid)
        dashboard = await call(session, "get_process_dashboard")
        assert any(entry["pid"] == pid for entry in dashboard["processes"])
        assert (await call(session, "terminate_process", pid=pid))["message"] == (
            f"Process {pid} terminated successfully"
        )
        assert not _group_alive(pid)
        gone = await session.call_tool("terminate_process", {"pid": pid})
        assert gone.is_error and f"Failed to terminate process {pid}" in _text(gone)

    driver(scenario)


def test_a_cancelled_call_kills_its_run_unless_another_client_waits(
    live_server: LiveServer, tmp_path: Path
) -> None:
    alone = f"sleep 30 & sleep 30; echo alone {uuid.uuid4().hex}"  # cacheable, yet killed
    shared = f"sleep 2; echo shared {uuid.uuid4().hex}"

    async def scenario(session: ClientSession) -> None:
        with anyio.move_on_after(1.0):
            await session.call_tool("execute_command", {"command": alone})
        job = await _until(lambda: _job_for(live_server, alone, ended=True))
        assert job["status"] == "cancelled" and not _group_alive(job["pid"])

        waiter: list[dict[str, Any]] = []

        async def wait_over_http() -> None:
            waiter.append(
                await anyio.to_thread.run_sync(
                    lambda: requests.post(
                        f"{live_server.url}/api/command", json={"command": shared}, timeout=30
                    ).json()
                )
            )

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait_over_http)
            await _until(lambda: _job_for(live_server, shared))
            with anyio.move_on_after(0.5):
                await session.call_tool("execute_command", {"command": shared})
        assert waiter[0]["success"] is True and waiter[0]["stdout"].startswith("shared")

    for over_http in (False, True):
        if over_http:

            async def main() -> None:
                async with http_session(live_server.url) as session:
                    await scenario(session)

            anyio.run(main)
        else:
            drive(["--server", live_server.url], tmp_path / "mcp.log", scenario)
        alone, shared = alone + " again", shared + " again"


async def _job_for(server: LiveServer, command: str, ended: bool = False) -> dict[str, Any] | None:
    """The server's job for ``command`` (once ended, when asked so), if it has one."""
    jobs = (
        await anyio.to_thread.run_sync(
            lambda: requests.get(f"{server.url}/api/jobs", timeout=10).json()
        )
    )["jobs"]
    for job in jobs:
        if job["command"] == command and (not ended or job["status"] not in ("running", "paused")):
            found: dict[str, Any] = job
            return found
    return None


def test_mcp_over_http_takes_the_api_tokens_and_clear_needs_the_admin_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    token, admin = "t" * 32, "a" * 32
    server = live_server_factory(env={"RUNCACHE_TOKEN": token, "RUNCACHE_ADMIN_TOKEN": admin})
    refused = requests.post(f"{server.url}/mcp", json={}, timeout=10)
    assert refused.status_code == 401 and "needs a token" in refused.json()["error"]
    wrong = requests.post(
        f"{server.url}/mcp", json={}, timeout=10, headers={"Authorization": "Bearer wrong"}
    )
    assert wrong.status_code == 403

    async def main() -> None:
        async with http_session(server.url, token) as session:
            ran = await call(session, "execute_command", command="echo over http")
            assert ran["stdout"] == "over http\n"
            assert "clear_cache" not in (await _listed(session))[0]  # not for a plain token
            cleared = await session.call_tool("clear_cache", {})
            assert cleared.is_error and "needs the admin token" in _text(cleared)
            assert (await call(session, "get_cache_stats"))["size"] == 1  # nothing cleared
        async with http_session(server.url, admin) as session:
            assert (await _listed(session))[0] == list(DEFAULT_TOOLS)
            assert (await call(session, "clear_cache"))["success"] is True
            assert (await call(session, "get_cache_stats"))["size"] == 0

    anyio.run(main)


def test_mcp_over_http_with_several_workers(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """Workers share a port, so a session's requests may reach either: each stands alone."""
    server = live_server_factory("--workers", "2", "--store", f"sqlite:///{tmp_path}/cache.db")

    async def main() -> None:
        for _ in range(3):  # new connections, spread over the workers by the kernel
            async with http_session(server.url) as session:
                ran = await call(session, "execute_command", command="echo shared by workers")
                assert ran["stdout"] == "shared by workers\n"

    anyio.run(main)


def test_a_scope_keys_its_own_results_through_both_tools(driver: Driver) -> None:
    async def scenario(session: ClientSession) -> None:
        command = f"date +%N # {uuid.uuid4().hex}"
        plain = await call(session, "execute_command", command=command)
        scoped = await call(session, "execute_command", command=command, scope="team-a")
        assert scoped["cache_key"] != plain["cache_key"]
        assert scoped["stdout"] != plain["stdout"] and not scoped["cached"]
        started = await call(session, "start_command", command=command, scope="team-a")
        # The same scope: the same entry, answered from the cache (no pid: nothing ran).
        assert (started["cache_key"], started["pid"]) == (scoped["cache_key"], None)
        other = await call(session, "execute_command", command=command, scope="team-b")
        assert other["cache_key"] not in {plain["cache_key"], scoped["cache_key"]}

    driver(scenario)


def test_run_context_arguments_reach_the_command_and_its_key(
    driver: Driver, tmp_path: Path
) -> None:
    """cwd, env and stdin through execute_command and start_command, over both backends."""
    show = 'pwd; echo "A=$A"; cat'

    async def scenario(session: ClientSession) -> None:
        ran = await call(
            session,
            "execute_command",
            command=show,
            cwd=str(tmp_path),
            env={"A": "mcp"},
            stdin="fed",
        )
        assert ran["stdout"] == f"{tmp_path}\nA=mcp\nfed"
        plain = await call(session, "execute_command", command=show)
        assert plain["cache_key"] != ran["cache_key"] and "A=mcp" not in plain["stdout"]
        started = await call(
            session, "start_command", command=show, cwd=str(tmp_path), env={"A": "mcp"}, stdin="fed"
        )
        # The same context: the same entry, answered from the cache (no pid: nothing ran).
        assert (started["cache_key"], started["pid"]) == (ran["cache_key"], None)
        refused = await session.call_tool(
            "execute_command", {"command": show, "cwd": "/no/such/dir"}
        )
        assert refused.is_error and "not an existing directory" in _text(refused)

    driver(scenario)
