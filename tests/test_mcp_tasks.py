"""MCP's tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663), spoken by a raw
JSON-RPC client (no SDK): over stdio to a real ``runcache mcp``, over Streamable HTTP to a
real ``runcache serve`` (with sessions and without), and across two servers on one
real redis-server, a task made on one read and cancelled on the other.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import requests

from conftest import LiveServer, alive, marked, marker, until

Json = dict[str, Any]

EXTENSION = "io.modelcontextprotocol/tasks"
#: A request's ``_meta`` declaring the extension, as the text spells it.
DECLARED: Json = {"io.modelcontextprotocol/clientCapabilities": {"extensions": {EXTENSION: {}}}}
#: The same on the 2026-07-28 revision, whose requests carry their protocol version too.
MODERN = {**DECLARED, "io.modelcontextprotocol/protocolVersion": "2026-07-28"}
TASK_FIELDS = {"taskId", "status", "createdAt", "lastUpdatedAt", "ttlMs", "pollIntervalMs"}
#: --job-retention as these tests set it, and so the least ttlMs a task says.
RETENTION = 120

StartServer = Callable[..., LiveServer]


def _initialize(capabilities: Json | None = None) -> Json:
    return {
        "protocolVersion": "2025-11-25",
        "capabilities": capabilities or {},
        "clientInfo": {"name": "raw", "version": "1"},
    }


class Stdio:
    """JSON-RPC over a ``runcache mcp`` process's stdin and stdout, a line each."""

    def __init__(
        self, capabilities: Json | None = None, handshake: bool = True, server: str = ""
    ) -> None:
        """``handshake``: open with ``initialize`` (2025-11-25), or not (2026-07-28, where
        each request carries its protocol version and capabilities in its ``_meta``).
        ``server``: forward to the runcache server at that URL (``--server``)."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
        environment["RUNCACHE_JOB_RETENTION"] = str(RETENTION)
        forward = ["--server", server] if server else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runcache", "mcp", *forward],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=environment,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.ids = itertools.count(1)
        if handshake:
            hello = self.request("initialize", _initialize(capabilities))
            assert hello["result"]["protocolVersion"] == "2025-11-25"
            self.notify("notifications/initialized")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def _send(self, message: Json) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def notify(self, method: str) -> None:
        self._send({"jsonrpc": "2.0", "method": method})

    def request(self, method: str, params: Json) -> Json:
        """The answer to one request (notifications on the way skipped)."""
        number = next(self.ids)
        self._send({"jsonrpc": "2.0", "id": number, "method": method, "params": params})
        while True:
            message: Json = json.loads(self.lines.get(timeout=30))
            if message.get("id") == number:
                return message

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        self.process.stdout.close()


@pytest.fixture
def stdio() -> Iterator[Stdio]:
    client = Stdio()
    yield client
    client.close()


class Http:
    """JSON-RPC over Streamable HTTP to ``/mcp``; the session it opened, if any."""

    def __init__(self, server: LiveServer) -> None:
        self.url = server.url + "/mcp"
        self.headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self.ids = itertools.count(1)
        answer = self.post(
            {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": _initialize()}
        )
        session = answer.headers.get("mcp-session-id")
        if session:
            self.headers["mcp-session-id"] = session
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post(self, message: Json, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(
            self.url, json=message, headers={**self.headers, **(headers or {})}, timeout=30
        )

    def request(self, method: str, params: Json, headers: dict[str, str] | None = None) -> Json:
        number = next(self.ids)
        message = {"jsonrpc": "2.0", "id": number, "method": method, "params": params}
        return _answer_of(self.post(message, headers), number)

    def task(self, method: str, task_id: str, **params: Any) -> Json:
        """A ``tasks/*`` request as the text has a client send one over HTTP: declared, and
        the task's id in the ``Mcp-Name`` header."""
        params = {"taskId": task_id, "_meta": DECLARED, **params}
        return self.request(method, params, {"Mcp-Name": task_id})


def _answer_of(answer: requests.Response, number: int) -> Json:
    """The JSON-RPC answer numbered ``number`` in a JSON body or an event stream."""
    assert answer.status_code == 200, answer.text
    if "text/event-stream" not in answer.headers.get("content-type", ""):
        found: Json = answer.json()
        return found
    for line in answer.text.splitlines():
        if line.startswith("data: "):
            message: Json = json.loads(line[6:])
            if message.get("id") == number:
                return message
    raise AssertionError(f"no answer {number} in {answer.text!r}")


Client = Stdio | Http


def _get(client: Client, task_id: str) -> Json:
    if isinstance(client, Http):
        return client.task("tasks/get", task_id)
    return client.request("tasks/get", {"taskId": task_id, "_meta": DECLARED})


def _call(client: Client, tool: str, arguments: Json, meta: Json | None = DECLARED) -> Json:
    params: Json = {"name": tool, "arguments": arguments}
    if meta is not None:
        params["_meta"] = meta
    answer = client.request("tools/call", params)
    assert "result" in answer, answer
    result: Json = answer["result"]
    return result


def _until_status(client: Client, task_id: str, status: str) -> Json:
    def probe() -> Json | None:
        task: Json = _get(client, task_id)["result"]
        return task if task["status"] == status else None

    return until(probe, 30, what=f"task {task_id} {status}")


def _sleeping(mark: str) -> psutil.Process:
    """The ``sleep`` of a run's command (not the shell around it, which names it too)."""
    found = until(lambda: [p for p in marked(mark) if p.name() == "sleep"], what="the sleep")
    return found[0]


def _check_task(task: Json, result_type: str, status: str) -> None:
    """A task as the text spells it, with runcache's ttl and poll interval."""
    assert task["resultType"] == result_type
    assert TASK_FIELDS <= set(task), task
    assert task["status"] == status
    assert task["createdAt"].endswith("Z") and task["lastUpdatedAt"] >= task["createdAt"]
    assert RETENTION * 1000 <= task["ttlMs"] < (RETENTION + 60) * 1000
    assert task["pollIntervalMs"] == 1000


def _tasks_run_to_their_result(client: Client) -> None:
    """``execute_command`` answered with a task, polled to its result; ``start_command``
    too; the same calls undeclared answered as ever."""
    mark = marker()
    task = _call(client, "execute_command", {"command": f"echo first; sleep {mark}; echo last"})
    _check_task(task, "task", "working")
    assert "content" not in task and "result" not in task

    def printed() -> Json | None:  # the status message is the last line printed
        found: Json = _get(client, task["taskId"])["result"]
        return found if found.get("statusMessage") == "first" else None

    _check_task(until(printed, 30, what="the first line"), "complete", "working")
    sleep = _sleeping(mark)
    sleep.kill()  # the sleep ends now, and the shell goes on to its last line
    done = _until_status(client, task["taskId"], "completed")
    _check_task(done, "complete", "completed")
    result = done["result"]
    assert result["structuredContent"]["stdout"] == "first\nlast\n"
    assert result["structuredContent"]["job_id"] == task["taskId"]
    assert not result["isError"]
    links = [item["uri"] for item in result["content"] if item["type"] == "resource_link"]
    assert links == [
        f"runcache://jobs/{task['taskId']}/stdout",
        f"runcache://jobs/{task['taskId']}/stderr",
    ]

    started = _call(client, "start_command", {"command": "sleep 0.3; echo started"})
    _check_task(started, "task", "working")
    ended = _until_status(client, started["taskId"], "completed")
    assert ended["result"]["structuredContent"]["stdout"] == "started\n"

    plain = _call(client, "execute_command", {"command": "echo plain"}, meta=None)
    assert "resultType" not in plain or plain["resultType"] != "task"
    assert plain["structuredContent"]["stdout"] == "plain\n"
    accepted = _call(client, "start_command", {"command": "sleep 0.2"}, meta=None)
    assert set(accepted["structuredContent"]) == {"job_id", "status", "cache_key", "pid"}


def _cancel_kills_the_run(client: Client) -> None:
    mark = marker()
    task = _call(client, "start_command", {"command": f"sleep {mark}"})
    until(lambda: marked(mark), what="the run to start")
    if isinstance(client, Http):
        acknowledged = client.task("tasks/cancel", task["taskId"])
    else:
        acknowledged = client.request("tasks/cancel", {"taskId": task["taskId"], "_meta": DECLARED})
    assert acknowledged["result"]["resultType"] == "complete"
    assert set(acknowledged["result"]) <= {"resultType", "_meta"}
    until(lambda: not marked(mark), what="the run to be killed")
    cancelled = _until_status(client, task["taskId"], "cancelled")
    assert "result" not in cancelled


def test_over_stdio_a_declared_call_is_a_task_polled_to_its_result(stdio: Stdio) -> None:
    _tasks_run_to_their_result(stdio)


def test_over_stdio_tasks_cancel_kills_the_run(stdio: Stdio) -> None:
    _cancel_kills_the_run(stdio)


def test_through_mcp_server_forwarding_tasks_run_and_are_cancelled(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """``runcache mcp --server URL`` offers tasks with the server's --job-retention (its
    /health says it), and reads and cancels them through the server."""
    server = live_server_factory("--job-retention", str(RETENTION))
    client = Stdio(server=server.url)
    try:
        _tasks_run_to_their_result(client)
        _cancel_kills_the_run(client)
    finally:
        client.close()


def test_over_stdio_the_errors_are_the_texts(stdio: Stdio) -> None:
    task = _call(stdio, "start_command", {"command": "sleep 0.5"})
    task_id = task["taskId"]
    for method in ("tasks/get", "tasks/cancel"):
        refused = stdio.request(method, {"taskId": task_id})
        assert refused["error"]["code"] == -32021, refused
        assert refused["error"]["data"] == {"requiredCapabilities": {"extensions": {EXTENSION: {}}}}
        unknown = stdio.request(method, {"taskId": "0" * 32, "_meta": DECLARED})
        assert unknown["error"] == {
            "code": -32602,
            "message": "Failed to retrieve task: Task not found",
        }
    update = {"taskId": "0" * 32, "inputResponses": {}, "_meta": DECLARED}
    assert stdio.request("tasks/update", update)["error"]["code"] == -32602
    nameless = stdio.request("tasks/get", {"_meta": DECLARED})
    assert nameless["error"]["code"] == -32602
    # runcache asks no input: an update of a known task is acknowledged, and ignored.
    ack = stdio.request(
        "tasks/update", {**update, "taskId": task_id, "inputResponses": {"x": {"action": "accept"}}}
    )
    assert ack["result"]["resultType"] == "complete"
    assert _get(stdio, task_id)["result"]["status"] in ("working", "completed")


def test_a_client_that_does_not_declare_it_on_the_request_never_sees_a_task() -> None:
    # Declared at initialize only: the text counts only the request's own declaration.
    client = Stdio({"extensions": {EXTENSION: {}}})
    try:
        answer = _call(client, "execute_command", {"command": "sleep 0.2; echo inline"}, meta=None)
        assert answer.get("resultType") != "task"
        assert answer["structuredContent"]["stdout"] == "inline\n"
        other: Json = {"io.modelcontextprotocol/clientCapabilities": {"extensions": {"x.y/z": {}}}}
        answer = _call(client, "start_command", {"command": "sleep 0.2"}, meta=other)
        assert answer.get("resultType") != "task" and "job_id" in answer["structuredContent"]
    finally:
        client.close()


def test_a_call_that_sets_its_own_cut_or_ends_at_once_is_answered_inline(stdio: Stdio) -> None:
    cut = _call(
        stdio, "execute_command", {"command": "sleep 0.2; echo 0123456789", "max_output_chars": 4}
    )
    assert cut.get("resultType") != "task"
    assert cut["structuredContent"]["stdout"].startswith("01\n[runcache:")
    # The same command again: answered from the cache, ended before any task could be.
    first = _call(stdio, "execute_command", {"command": "sleep 0.2; echo cached"})
    _until_status(stdio, first["taskId"], "completed")
    again = _call(stdio, "execute_command", {"command": "sleep 0.2; echo cached"})
    assert again.get("resultType") != "task" and again["structuredContent"]["cached"] is True


def test_the_2026_revision_discovers_the_extension_and_gets_tasks() -> None:
    stdio = Stdio(handshake=False)
    try:
        _discover_and_get(stdio)
    finally:
        stdio.close()


def _discover_and_get(stdio: Stdio) -> None:
    discovered = stdio.request("server/discover", {"_meta": MODERN})["result"]
    assert discovered["capabilities"]["extensions"] == {EXTENSION: {}}
    params = {"name": "start_command", "arguments": {"command": "sleep 0.2"}, "_meta": MODERN}
    task = stdio.request("tools/call", params)["result"]
    _check_task(task, "task", "working")
    got = stdio.request("tasks/get", {"taskId": task["taskId"], "_meta": MODERN})["result"]
    assert got["taskId"] == task["taskId"] and got["resultType"] == "complete"


@pytest.mark.parametrize("stateless", ["false", "true"])
def test_over_http_tasks_run_are_cancelled_and_need_their_mcp_name(
    live_server_factory: StartServer, stateless: str
) -> None:
    server = live_server_factory("--mcp-stateless", stateless, "--job-retention", str(RETENTION))
    client = Http(server)
    _tasks_run_to_their_result(client)
    _cancel_kills_the_run(client)
    task = _call(client, "start_command", {"command": "sleep 0.3"})
    params = {"taskId": task["taskId"], "_meta": DECLARED}
    for headers in ({}, {"Mcp-Name": "0" * 32}):
        refused = client.request("tasks/get", params, headers)
        assert refused["error"]["code"] == -32020, refused  # a header that does not match
    unknown = client.task("tasks/get", "f" * 32)
    assert unknown["error"]["code"] == -32602


def test_a_task_made_on_one_server_is_read_and_cancelled_on_another(
    live_server_factory: StartServer, redis_url: str
) -> None:
    flags = ("--store", redis_url, "--mcp-stateless", "true", "--job-retention", str(RETENTION))
    first, second = live_server_factory(*flags), live_server_factory(*flags)
    on_a, on_b = Http(first), Http(second)

    done = _call(on_a, "execute_command", {"command": "sleep 0.3; echo from A"})
    _check_task(done, "task", "working")
    result = _until_status(on_b, done["taskId"], "completed")["result"]
    assert result["structuredContent"]["stdout"] == "from A\n"

    mark = marker()
    task = _call(on_a, "start_command", {"command": f"echo going; sleep {mark}"})
    # Handed out only once on the board: the other server finds it at once.
    _check_task(on_b.task("tasks/get", task["taskId"])["result"], "complete", "working")
    sleep = _sleeping(mark)
    assert on_b.task("tasks/cancel", task["taskId"])["result"]["resultType"] == "complete"
    until(lambda: not marked(mark), what="the run on A to be killed")
    assert not alive(sleep)
    _until_status(on_b, task["taskId"], "cancelled")
    assert _until_status(on_a, task["taskId"], "cancelled")["taskId"] == task["taskId"]
