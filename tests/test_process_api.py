"""The reference API's process routes, on real servers with real commands.

Every answer is checked twice: against the field lists of ``spec/processes.md``
written out here (every field present, no other), and against the schema
``/openapi.json`` documents for its route and status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from conftest import LiveServer, held, until

Json = dict[str, Any]

# -- the spec's shapes, as its tables list them ---------------------------------------


def _object(**properties: Json) -> Json:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_TEXT: Json = {"type": "string"}
_COUNT: Json = {"type": "integer", "minimum": 0}
_NUMBER: Json = {"type": "number", "minimum": 0}
_DURATION: Json = {"type": "string", "pattern": r"^\d+\.\ds$"}
_TIMESTAMP: Json = {"type": "string", "format": "date-time"}
_SUCCESS: Json = {"const": True}

PROCESS = _object(
    pid={"type": "integer"},
    command=_TEXT,
    status={"enum": ["running", "paused", "terminated", "completed"]},
    start_time=_NUMBER,
    progress={"type": "number", "minimum": 0, "maximum": 1},
    last_output={"type": "string", "maxLength": 200},
    bytes_processed=_COUNT,
    runtime_formatted=_DURATION,
    eta_formatted=_TEXT,
)
DASH = _object(
    pid={"type": "integer"},
    command={"type": "string", "maxLength": 63},
    status=_TEXT,
    runtime=_DURATION,
    progress_percent={"type": "string", "pattern": r"^\d+\.\d%$"},
    progress_bar=_TEXT,
    eta=_TEXT,
    bytes_processed=_COUNT,
    last_output={"type": "string", "maxLength": 100},
)
SPEC: dict[str, Json] = {
    "list": _object(
        success=_SUCCESS,
        active_processes={
            "type": "object",
            "additionalProperties": PROCESS,
            "propertyNames": {"pattern": r"^\d+$"},
        },
        total_count=_COUNT,
    ),
    "status": _object(success=_SUCCESS, process=PROCESS),
    "done": _object(success=_SUCCESS, message=_TEXT),
    "failure": _object(success={"const": False}, error=_TEXT),
    "dashboard": _object(
        timestamp=_TIMESTAMP,
        total_processes=_COUNT,
        processes={"type": "array", "items": DASH},
        system_load=_object(cpu_percent=_NUMBER, memory_percent=_NUMBER, active_connections=_COUNT),
    ),
    "submitted": _object(
        success=_SUCCESS,
        task_id=_TEXT,
        command=_TEXT,
        status={"const": "submitted"},
        timestamp=_TIMESTAMP,
    ),
    "task": _object(
        success=_SUCCESS,
        task_id=_TEXT,
        timestamp=_TIMESTAMP,
        result=_object(
            status={"enum": ["running", "completed", "failed"]},
            result={"type": ["object", "null"]},
            execution_time=_NUMBER,
        ),
    ),
    "error": _object(error=_TEXT),
}


class Checked:
    """A client of one server whose every answer is checked against the spec's shape
    and against the schema the server's OpenAPI document gives its route and status."""

    def __init__(self, server: LiveServer) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=15)
        self.document: Json = self.http.get("/openapi.json").json()

    def call(
        self,
        method: str,
        template: str,
        spec: str,
        status: int = 200,
        body: Json | None = None,
        **params: str,
    ) -> Json:
        response = self.http.request(method, template.format(**params), json=body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        answer: Json = response.json()
        Draft202012Validator(SPEC[spec], format_checker=FormatChecker()).validate(answer)
        documented = self.document["paths"][template][method.lower()]["responses"][str(status)]
        if "$ref" in documented:
            name = documented["$ref"].split("/")[-1]
            documented = self.document["components"]["responses"][name]
        schema = {
            **documented["content"]["application/json"]["schema"],
            "components": self.document["components"],
        }
        Draft202012Validator(schema, format_checker=FormatChecker()).validate(answer)
        return answer

    def submit(self, command: str, **fields: object) -> str:
        answer = self.call(
            "POST", "/api/process/execute-async", "submitted", body={"command": command, **fields}
        )
        assert answer["command"] == command
        task_id: str = answer["task_id"]
        return task_id

    def active(self) -> Json:
        answer = self.call("GET", "/api/processes/list", "list")
        assert answer["total_count"] == len(answer["active_processes"])
        processes: Json = answer["active_processes"]
        return processes

    def pid_of(self, command: str) -> int:
        """The pid of the listed run of ``command``, once it prints its first line."""

        def listed() -> int | None:
            for pid, process in self.active().items():
                if process["command"] == command and process["last_output"]:
                    assert process["pid"] == int(pid)
                    return int(pid)
            return None

        return until(listed)

    def task(self, task_id: str) -> Json:
        answer = self.call("GET", "/api/process/get-task-result/{task_id}", "task", task_id=task_id)
        assert answer["task_id"] == task_id
        state: Json = answer["result"]
        return state


@pytest.fixture
def api(live_server: LiveServer) -> Iterator[Checked]:
    checked = Checked(live_server)
    yield checked
    checked.http.close()


def _group(pid: int) -> list[psutil.Process]:
    leader = psutil.Process(pid)
    return [leader, *leader.children(recursive=True)]


def _group_of_two(pid: int) -> list[psutil.Process] | None:
    """The group led by ``pid`` once it is the shell and its one command, else None."""
    members = _group(pid)
    return members if len(members) == 2 else None


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


#: A run with a child that would sleep long after its first line.
SLEEPER = "sleep 30 & echo started; wait"


# -- the tests -----------------------------------------------------------------------


def test_execute_async_goes_from_running_to_completed_with_the_result(
    api: Checked,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    task_id = api.submit(f"while [ ! -e {gate} ]; do sleep 0.01; done; echo done", use_cache=False)
    state = api.task(task_id)
    assert (state["status"], state["result"]) == ("running", None)
    gate.touch()
    state = until(lambda: (s := api.task(task_id))["status"] != "running" and s)
    assert state["status"] == "completed"
    assert state["result"]["stdout"] == "done\n"
    assert (state["result"]["return_code"], state["result"]["cached"]) == (0, False)
    assert state["execution_time"] > 0


def test_a_task_that_fails_or_is_cached(api: Checked) -> None:
    failing = api.submit("echo oops >&2; exit 3", use_cache=False)
    state = until(lambda: (s := api.task(failing))["status"] != "running" and s)
    assert state["status"] == "failed"
    assert (state["result"]["return_code"], state["result"]["stderr"]) == (3, "oops\n")

    api.http.post("/api/command", json={"command": "echo kept"})
    state = api.task(api.submit("echo kept"))  # answered from the cache at once
    assert (state["status"], state["result"]["cached"]) == ("completed", True)
    assert state["result"]["stdout"] == "kept\n"


def test_execute_async_checks_its_body_as_post_api_command_does(api: Checked) -> None:
    answer = api.call("POST", "/api/process/execute-async", "error", status=400, body={})
    assert answer == {"error": "Command parameter is required"}


def test_list_status_and_dashboard_show_every_run(api: Checked, tmp_path: Path) -> None:
    command = f"{SLEEPER} # {'x' * 80}"
    task_id = api.submit(command, use_cache=False)
    pid = api.pid_of(command)

    # A foreground POST /api/command is listed too while it runs.
    gate = tmp_path / "gate"
    foreground = f"echo waiting; while [ ! -e {gate} ]; do sleep 0.01; done"
    answered: list[int] = []
    waiter = threading.Thread(
        target=lambda: answered.append(
            api.http.post(
                "/api/command", json={"command": foreground, "use_cache": False}
            ).status_code
        )
    )
    waiter.start()
    try:
        other = api.pid_of(foreground)
        process = api.active()[str(pid)]
        assert process == {
            **process,
            "pid": pid,
            "command": command,
            "status": "running",
            "progress": 0.0,
            "last_output": "started",
            "bytes_processed": 8,
            "eta_formatted": "Unknown",
        }
        assert time.time() - 30 < process["start_time"] <= time.time()
        status = api.call("GET", "/api/processes/status/{pid}", "status", pid=str(pid))
        assert status["process"]["pid"] == pid

        started = time.monotonic()
        board = api.call("GET", "/api/processes/dashboard", "dashboard")
        assert time.monotonic() - started < 0.5  # no one-second CPU sample on the way
        assert board["total_processes"] == len(board["processes"]) == 2
        entry = next(entry for entry in board["processes"] if entry["pid"] == pid)
        assert entry == {
            **entry,
            "command": command[:60] + "...",
            "status": "running",
            "progress_percent": "0.0%",
            "eta": "Calculating...",
            "bytes_processed": 8,
            "last_output": "started",
        }
        assert entry["progress_bar"] and set(entry["progress_bar"]) == {"░"}
        assert board["system_load"]["active_connections"] >= 1  # this very request
        assert {e["pid"] for e in board["processes"]} == {pid, other}
    finally:
        gate.touch()
        waiter.join(15)
    assert answered == [200]
    api.call("POST", "/api/processes/terminate/{pid}", "done", pid=str(pid))
    assert api.active() == {}
    assert api.task(task_id)["status"] == "failed"


def test_terminate_kills_the_whole_group(api: Checked) -> None:
    task_id = api.submit(SLEEPER, use_cache=False)
    pid = api.pid_of(SLEEPER)
    group = until(lambda: _group_of_two(pid))

    answer = api.call("POST", "/api/processes/terminate/{pid}", "done", pid=str(pid))
    assert answer == {"success": True, "message": f"Process {pid} terminated successfully"}
    until(lambda: all(_gone(process) for process in group), seconds=5)
    assert str(pid) not in api.active()
    status = api.call("GET", "/api/processes/status/{pid}", "status", pid=str(pid))
    assert status["process"]["status"] == "terminated"
    state = api.task(task_id)
    assert (state["status"], state["result"]["cancelled"]) == ("failed", True)
    again = api.call("POST", "/api/processes/terminate/{pid}", "failure", status=404, pid=str(pid))
    assert again["error"] == f"Failed to terminate process {pid} or process not found"


def test_pause_stops_every_process_of_the_group_and_resume_continues_them(
    api: Checked,
) -> None:
    api.submit(SLEEPER, use_cache=False)
    pid = api.pid_of(SLEEPER)
    group = until(lambda: _group_of_two(pid))

    def states() -> set[str]:
        return {process.status() for process in group}

    answer = api.call("POST", "/api/processes/pause/{pid}", "done", pid=str(pid))
    assert answer == {"success": True, "message": f"Process {pid} paused successfully"}
    until(lambda: all(map(held, group)))
    status = api.call("GET", "/api/processes/status/{pid}", "status", pid=str(pid))
    assert status["process"]["status"] == "paused"
    assert api.active()[str(pid)]["status"] == "paused"
    twice = api.call("POST", "/api/processes/pause/{pid}", "failure", status=404, pid=str(pid))
    assert twice["error"] == f"Failed to pause process {pid} or process not found"

    answer = api.call("POST", "/api/processes/resume/{pid}", "done", pid=str(pid))
    assert answer == {"success": True, "message": f"Process {pid} resumed successfully"}
    until(lambda: psutil.STATUS_STOPPED not in states())
    status = api.call("GET", "/api/processes/status/{pid}", "status", pid=str(pid))
    assert status["process"]["status"] == "running"
    again = api.call("POST", "/api/processes/resume/{pid}", "failure", status=404, pid=str(pid))
    assert again["error"] == f"Failed to resume process {pid} or process not found"
    api.call("POST", "/api/processes/terminate/{pid}", "done", pid=str(pid))


def test_unknown_pids_and_tasks_answer_the_specs_404s(api: Checked) -> None:
    unknown = {"1": "1", "abc": "abc", "-5": "-5", "99999999999": "99999999999"}
    for text in unknown:
        answer = api.call("GET", "/api/processes/status/{pid}", "failure", status=404, pid=text)
        assert answer == {"success": False, "error": f"Process {text} not found"}
        for verb in ("terminate", "pause", "resume"):
            answer = api.call(
                "POST", f"/api/processes/{verb}/{{pid}}", "failure", status=404, pid=text
            )
            assert answer == {
                "success": False,
                "error": f"Failed to {verb} process {text} or process not found",
            }
    answer = api.call(
        "GET", "/api/process/get-task-result/{task_id}", "error", status=404, task_id="no-such-task"
    )
    assert answer == {"error": "Task not found"}
    assert api.call("GET", "/api/processes/list", "list")["total_count"] == 0
    board = api.call("GET", "/api/processes/dashboard", "dashboard")
    assert (board["total_processes"], board["processes"]) == (0, [])
