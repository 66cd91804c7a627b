"""Two ``runcache serve`` processes on one Redis behind Debian's nginx doing round-robin,
driven only through nginx, as a team runs it (docs/team.md, "Run it for a team").

nginx sends each request to the next server in turn (one nginx worker, so strictly in
turn), so consecutive requests about one job reach both servers: every answer below
is checked against what the job really is (its processes' state, read with psutil),
and nginx's access log shows that both servers answered. Clients send the balancer's
own name as ``Host`` (``runcache.test``), which the servers admit through
``--allowed-hosts``, as a team's must.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import requests
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import TextContent

from balancer import Nginx, site, start_nginx
from conftest import (
    Json,
    LiveServer,
    RedisServer,
    held,
    job_events,
    json_object,
    marked,
    marker,
    served,
    serving_several_tests,
    start_server,
    until,
)

#: The name clients reach the balancer by.
NAME = "runcache.test"


@dataclass
class Team:
    """Two servers on one Redis, and nginx in front of them."""

    servers: list[LiveServer]
    nginx: Nginx

    @property
    def host(self) -> str:
        """The ``Host`` a client of the balancer sends: its name and port."""
        return f"{NAME}:{self.nginx.port}"

    def request(self, method: str, path: str, status: int = 200, **options: Any) -> Json:
        headers = {"Host": self.host, **options.pop("headers", {})}
        answer = requests.request(
            method, self.nginx.url + path, headers=headers, timeout=30, **options
        )
        assert answer.status_code == status, answer.text
        return json_object(answer)

    def get(self, path: str, status: int = 200) -> Json:
        return self.request("GET", path, status)

    def post(self, path: str, status: int = 200, **options: Any) -> Json:
        return self.request("POST", path, status, **options)

    def start(self, command: str) -> Json:
        return self.post("/api/command", 202, json={"command": command, "background": True})

    def answered(self, path: str) -> set[int]:
        """The servers (their indexes) nginx sent requests for ``path`` to."""
        ports = {f"127.0.0.1:{server.port}": index for index, server in enumerate(self.servers)}
        return {ports[upstream] for upstream in self.nginx.upstreams(path)}

    def events(
        self, job_id: str, last: str | None = None, opened: threading.Event | None = None
    ) -> list[tuple[str, str, str]]:
        """A job's events read to their end through nginx: (kind, id, data) each."""
        headers = {"Host": self.host, **({"Last-Event-ID": last} if last else {})}
        return job_events(
            self.nginx.url, job_id, headers, opened.set if opened is not None else None
        )


@pytest.fixture(scope="module")
def team(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """One team for the module's tests (starting three processes is most of their time);
    each test leaves its jobs ended, and requests of one test at a time alternate."""
    store = f"{redis_server.url}?namespace=lb-{uuid.uuid4().hex}"
    flags = ("--store", store, "--allowed-hosts", NAME, "--mcp-stateless", "true")
    servers: list[LiveServer] = []
    nginx: Nginx | None = None
    kept: list[int] = []
    try:
        servers = [start_server(*flags), start_server(*flags)]
        for server in servers:  # a first run starts the server's watchdog, kept too
            answer = requests.post(
                f"{server.url}/api/command", json={"command": f": {server.port}"}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            process = psutil.Process(server.process.pid)
            kept += [process.pid, *(child.pid for child in process.children())]
        serving_several_tests(*kept)
        nginx = start_nginx(
            [server.url.removeprefix("http://") for server in servers],
            tmp_path_factory.mktemp("nginx"),
            NAME,
        )
        master = psutil.Process(nginx.process.pid)
        kept += [master.pid, *(worker.pid for worker in master.children())]
        serving_several_tests(*kept)
        yield Team(servers, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for server in servers:
            server.stop()
        served(*kept)
    for server in servers:
        server.assert_quiet_log()


def test_the_docs_show_the_configuration_tested_here() -> None:
    readme = (Path(__file__).resolve().parent.parent / "docs" / "team.md").read_text()
    shown = site(["10.0.0.11:8888", "10.0.0.12:8888"], "80", "runcache.internal")
    assert f"```nginx\n{shown}```" in readme
    assert "--allowed-hosts runcache.internal --mcp-stateless true" in readme


def state(mark: str) -> str:
    """The state of the ``sleep`` on ``mark`` (``stopped`` when paused), not of the shell
    around it, which names the mark too."""
    processes = [process for process in marked(mark) if process.name() == "sleep"]
    return processes[0].status() if processes else "gone"


def held_by_its_pause(mark: str) -> bool:
    """Whether every process of the run on ``mark`` is held by its pause (a shell caught
    between a vfork and its child's exec waits in the kernel: :func:`conftest.held`)."""
    processes = marked(mark)
    return bool(processes) and all(map(held, processes))


def test_a_job_is_read_paged_and_followed_through_the_balancer(team: Team, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    command = f"echo one; until [ -e {gate} ]; do sleep 0.05; done; echo two; echo err >&2"
    job_id = team.start(command)["job_id"]
    detail = f"/api/jobs/{job_id}"
    until(lambda: team.get(detail)["stdout_bytes"] == 4, what="the first line")
    for _ in range(4):  # in turn to each server: the same answer from both
        assert team.get(detail)["status"] == "running"
    page = team.get(f"{detail}/output?stream=stdout&offset=1&limit=2")
    assert (page["data"], page["next_offset"], page["eof"]) == ("ne", 3, False)
    opened = threading.Event()
    found: list[list[tuple[str, str, str]]] = []
    reader = threading.Thread(target=lambda: found.append(team.events(job_id, opened=opened)))
    reader.start()
    assert opened.wait(15), "no event came through nginx"
    gate.touch()
    reader.join(30)
    kinds = [(kind, event_id) for kind, event_id, _ in found[0]]
    assert kinds[0] == ("stdout", "4:0") and kinds[-1][0] == "result"
    result = json.loads(found[0][-1][2])
    assert (result["stdout"], result["stderr"]) == ("one\ntwo\n", "err\n")
    # Resumed after the first event, through the other server if the first served it.
    resumed = team.events(job_id, last="4:0")
    assert [kind for kind, _, _ in resumed] == ["stdout", "stderr", "result"]
    assert resumed[0][2] == "two\n"
    assert team.get(f"{detail}/output?stream=stderr")["data"] == "err\n"
    assert team.answered(detail) == {0, 1}
    assert team.answered(f"{detail}/events") == {0, 1}
    # The balancer's name is admitted; another name is refused, through nginx too.
    refused = team.request("GET", "/api/jobs", 403, headers={"Host": "evil.example"})
    assert "Host evil.example" in refused["error"]


def test_jobs_are_steered_through_the_balancer(team: Team) -> None:
    mark, other = marker(), marker()
    accepted = team.start(f"echo hi; sleep {mark}")
    # The next request goes to the other server, so the two jobs run on different ones.
    second = team.post("/api/process/execute-async", json={"command": f"echo ho; sleep {other}"})
    job_id, pid = accepted["job_id"], accepted["pid"]
    until(lambda: marked(mark) and marked(other), what="both runs")
    listed = {job["job_id"]: job for job in team.get("/api/jobs")["jobs"]}
    assert {job_id, second["task_id"]} <= listed.keys()
    pids = {str(server.process.pid) for server in team.servers}
    instances = {listed[job_id]["instance"], listed[second["task_id"]]["instance"]}
    assert {instance.split(":")[1] for instance in instances} == pids
    # The job routes, whichever server each request reaches.
    paused = team.post(f"/api/jobs/{job_id}/pause")
    assert paused == {"success": True, "job_id": job_id, "status": "paused"}
    # SIGSTOP takes effect when the kernel next schedules the process: waited for.
    until(lambda: held_by_its_pause(mark), what="the pause")
    conflict = team.post(f"/api/jobs/{job_id}/pause", 409)
    assert conflict["error"] == f"job {job_id} cannot be paused: it is paused"
    assert team.post(f"/api/jobs/{job_id}/resume")["status"] == "running"
    assert state(mark) != psutil.STATUS_STOPPED
    # The process routes.
    active = team.get("/api/processes/list")["active_processes"]
    assert str(pid) in active and active[str(pid)]["status"] == "running"
    assert team.get(f"/api/processes/status/{pid}")["process"]["status"] == "running"
    message = team.post(f"/api/processes/pause/{pid}")["message"]
    assert message == f"Process {pid} paused successfully"
    # SIGSTOP takes effect when the kernel next schedules the process: waited for.
    until(lambda: held_by_its_pause(mark), what="the pause")
    assert team.get(f"/api/processes/status/{pid}")["process"]["status"] == "paused"
    assert team.post(f"/api/processes/resume/{pid}")["success"] is True
    until(lambda: state(mark) != psutil.STATUS_STOPPED, what="the resume")
    task = team.get(f"/api/process/get-task-result/{second['task_id']}")
    assert task["result"]["status"] == "running"
    # execute-async answers before its run has a pid: the record on the board gains it.
    other_pid = until(
        lambda: team.get(f"/api/jobs/{second['task_id']}")["pid"], what="the second run's pid"
    )
    assert team.post(f"/api/processes/terminate/{other_pid}")["success"] is True
    until(lambda: not marked(other), what="the terminated run to go")
    # The dashboard's cancel: a same-origin POST, its Origin the balancer's.
    origin = {"Origin": f"http://{team.host}"}
    assert team.post(f"/api/jobs/{job_id}/cancel", headers=origin)["status"] == "cancelled"
    until(lambda: not marked(mark), what="the cancelled run to go")
    detail = team.get(f"/api/jobs/{job_id}")
    assert detail["status"] == "cancelled" and detail["result"]["stdout"] == "hi\n"
    ended = team.get(f"/api/process/get-task-result/{second['task_id']}")
    assert ended["result"]["status"] == "failed"
    # The two pauses came one after the other: nginx sent them to different servers.
    assert team.answered(f"/api/jobs/{job_id}/pause") == {0, 1}


def test_mcp_over_http_through_the_balancer(team: Team) -> None:
    mark = marker()

    async def call(session: ClientSession, tool: str, **arguments: Any) -> Json:
        result = await session.call_tool(tool, arguments)
        texts = [block.text for block in result.content if isinstance(block, TextContent)]
        assert not result.is_error, texts
        structured: Json | None = result.structured_content
        assert structured is not None
        return structured

    async def main() -> Json:
        async with create_mcp_http_client(headers={"Host": team.host}) as http:
            url = f"{team.nginx.url}/mcp"
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    started = await call(
                        session, "start_command", command=f"echo mcp; sleep {mark}"
                    )
                    job_id = started["job_id"]
                    page: Json = {}
                    for _ in range(50):  # bounded: 5 s
                        page = await call(session, "read_output", job_id=job_id)
                        if page["data"]:
                            break
                        await anyio.sleep(0.1)
                    assert page["data"] == "mcp\n" and page["eof"] is False
                    assert marked(mark)
                    return await call(session, "cancel_job", job_id=job_id)

    cancelled = anyio.run(main)
    assert cancelled["status"] == "cancelled"
    until(lambda: not marked(mark), what="the cancelled run to go")
    # One session's requests went to both servers, and it held.
    assert team.answered("/mcp") == {0, 1}
