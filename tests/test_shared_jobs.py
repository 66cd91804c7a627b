"""Jobs every instance sees: real ``runcache serve`` processes sharing one Redis or one SQLite
file, a job started on one read, followed and steered from the other, and instances
that die (SIGKILL) or lose their Redis mid-job.

Each test starts its servers with a namespace (or a file) of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests

from runcache.stores import open_store
from runcache.stores.board import JobRecord, open_board

from conftest import (
    LiveServer,
    RedisServer,
    alive,
    free_port,
    held,
    job_events,
    json_object,
    marked,
    marker,
    until,
)

StartServer = Callable[..., LiveServer]

STOPPED = "the instance running this job stopped answering"


def start(server: LiveServer, command: str) -> dict[str, Any]:
    answer = requests.post(
        server.url + "/api/command", json={"command": command, "background": True}, timeout=30
    )
    assert answer.status_code == 202, answer.text
    return json_object(answer)


def get(server: LiveServer, path: str, status: int = 200) -> dict[str, Any]:
    answer = requests.get(server.url + path, timeout=30)
    assert answer.status_code == status, answer.text
    return json_object(answer)


def post(server: LiveServer, path: str, status: int = 200) -> dict[str, Any]:
    answer = requests.post(server.url + path, timeout=30)
    assert answer.status_code == status, answer.text
    return json_object(answer)


def events(server: LiveServer, job_id: str, last: str | None = None) -> list[tuple[str, str, str]]:
    """The events of a job read to their end: (kind, id, data) each."""
    return job_events(server.url, job_id, {"Last-Event-ID": last} if last is not None else {})


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


def test_a_job_started_on_one_server_is_the_deployments(
    live_server_factory: StartServer, shared_url: str
) -> None:
    one = live_server_factory("--store", shared_url)
    two = live_server_factory("--store", shared_url)
    mark = marker()
    accepted = start(one, f"echo first; echo warn >&2; sleep {mark}; echo last")
    job_id, pid = accepted["job_id"], accepted["pid"]
    until(lambda: get(two, f"/api/jobs/{job_id}", status=200)["stdout_bytes"] == 6, what="output")
    listed = [job for job in get(two, "/api/jobs")["jobs"] if job["job_id"] == job_id]
    assert listed and listed[0]["status"] == "running" and listed[0]["pid"] == pid
    assert listed[0]["instance"].split(":")[1] == str(one.process.pid)
    page = get(two, f"/api/jobs/{job_id}/output?stream=stdout&offset=2&limit=3")
    assert (page["data"], page["next_offset"], page["eof"]) == ("rst", 5, False)
    assert get(two, f"/api/jobs/{job_id}/output?stream=stderr")["data"] == "warn\n"
    # The process routes of the other server find the run by its pid.
    assert str(pid) in get(two, "/api/processes/list")["active_processes"]
    assert get(two, f"/api/processes/status/{pid}")["process"]["status"] == "running"
    assert (
        post(two, f"/api/processes/pause/{pid}")["message"] == f"Process {pid} paused successfully"
    )
    until(lambda: held_by_its_pause(mark), what="the pause")  # when scheduled
    assert post(two, f"/api/processes/resume/{pid}")["success"] is True
    until(lambda: state(mark) != psutil.STATUS_STOPPED, what="the resume")
    # The job routes steer it, with today's answers and conflicts.
    assert post(two, f"/api/jobs/{job_id}/pause") == {
        "success": True,
        "job_id": job_id,
        "status": "paused",
    }
    until(lambda: held_by_its_pause(mark), what="the pause")  # when scheduled
    conflict = post(two, f"/api/jobs/{job_id}/pause", status=409)
    assert conflict["error"] == f"job {job_id} cannot be paused: it is paused"
    assert post(two, f"/api/jobs/{job_id}/resume")["status"] == "running"
    assert state(mark) != psutil.STATUS_STOPPED
    task = get(two, f"/api/process/get-task-result/{job_id}")
    assert task["result"]["status"] == "running"
    assert post(two, f"/api/jobs/{job_id}/cancel")["status"] == "cancelled"
    until(lambda: not marked(mark), what="the cancelled run to go")
    detail = get(two, f"/api/jobs/{job_id}")
    assert detail["status"] == "cancelled" and detail["result"]["cancelled"] is True
    assert detail["result"]["stdout"] == "first\n"
    conflict = post(two, f"/api/jobs/{job_id}/cancel", status=409)
    assert conflict["error"] == f"job {job_id} cannot be cancelled: it has ended (cancelled)"


def test_another_servers_job_is_followed_and_resumed_from_an_event_id(
    live_server_factory: StartServer, shared_url: str, tmp_path: Path
) -> None:
    one = live_server_factory("--store", shared_url)
    two = live_server_factory("--store", shared_url)
    gate = tmp_path / "gate"
    command = f"echo one; until [ -e {gate} ]; do sleep 0.05; done; echo two; echo err >&2"
    job_id = start(one, command)["job_id"]
    found: list[list[tuple[str, str, str]]] = []
    reader = threading.Thread(target=lambda: found.append(events(two, job_id)))
    reader.start()
    until(lambda: get(two, f"/api/jobs/{job_id}")["stdout_bytes"] == 4, what="the first line")
    gate.touch()
    reader.join(30)
    kinds = [(kind, event_id) for kind, event_id, _ in found[0]]
    assert kinds[0] == ("stdout", "4:0") and kinds[-1][0] == "result"
    text = "".join(data + "\n" for kind, _, data in found[0] if kind == "stdout")
    assert "one" in text and "two" in text
    result = json.loads(found[0][-1][2])
    assert (result["stdout"], result["stderr"]) == ("one\ntwo\n", "err\n")
    resumed = events(two, job_id, last="4:0")
    assert [kind for kind, _, _ in resumed] == ["stdout", "stderr", "result"]
    assert resumed[0][2].startswith("two")


def test_leaving_another_servers_job_cancels_it(
    live_server_factory: StartServer, shared_url: str
) -> None:
    one = live_server_factory("--store", shared_url)
    two = live_server_factory("--store", shared_url)
    mark = marker()
    job_id = start(one, f"sleep {mark}")["job_id"]
    until(lambda: marked(mark), what="the run")
    assert post(two, f"/api/jobs/{job_id}/leave") == {
        "success": True,
        "job_id": job_id,
        "status": "cancelled",
    }
    until(lambda: not marked(mark), what="the run to go")


def test_workers_on_one_sqlite_file_all_answer_for_a_job(
    live_server_factory: StartServer, sqlite_url: str
) -> None:
    server = live_server_factory("--store", sqlite_url, "--workers", "2")
    mark = marker()
    job_id = start(server, f"echo hi; sleep {mark}")["job_id"]
    # Each request on a fresh connection: the kernel spreads them over both workers.
    for _ in range(8):
        answer = requests.get(
            f"{server.url}/api/jobs/{job_id}", headers={"Connection": "close"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
    assert post(server, f"/api/jobs/{job_id}/cancel")["status"] == "cancelled"
    until(lambda: not marked(mark), what="the run to go")


def test_mcp_on_one_server_reads_and_cancels_a_job_of_the_other(
    live_server_factory: StartServer, redis_url: str
) -> None:
    one = live_server_factory("--store", redis_url)
    two = live_server_factory("--store", redis_url)
    mark = marker()
    job_id = start(one, f"echo hello; sleep {mark}")["job_id"]
    until(lambda: get(two, f"/api/jobs/{job_id}")["stdout_bytes"] == 6, what="output")
    session = _Mcp(two)
    status = session.call("job_status", {"job_id": job_id})
    assert status["status"] == "running"
    page = session.call("read_output", {"job_id": job_id})
    assert page["data"] == "hello\n"
    assert session.call("cancel_job", {"job_id": job_id})["status"] == "cancelled"
    until(lambda: not marked(mark), what="the run to go")


class _Mcp:
    """Streamable HTTP MCP calls to ``/mcp``, each a JSON-RPC request on its own."""

    def __init__(self, server: LiveServer) -> None:
        self.url = server.url + "/mcp"
        self.headers = {"Accept": "application/json, text/event-stream"}
        hello = self._post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"},
                },
            }
        )
        session = hello.headers.get("mcp-session-id")
        if session:
            self.headers["mcp-session-id"] = session
        self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _post(self, message: dict[str, Any]) -> requests.Response:
        answer = requests.post(self.url, json=message, headers=self.headers, timeout=30)
        assert answer.status_code in (200, 202), answer.text
        return answer

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        answer = self._post(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments},
            }
        )
        text = answer.text
        if "text/event-stream" in answer.headers.get("content-type", ""):
            text = next(line[6:] for line in text.splitlines() if line.startswith("data: "))
        result = json.loads(text)["result"]
        assert not result.get("isError"), result
        structured: dict[str, Any] = result["structuredContent"]
        return structured


def test_a_killed_servers_jobs_fail_on_the_others_and_release_their_lease(
    live_server_factory: StartServer, shared_url: str
) -> None:
    one = live_server_factory("--store", shared_url, "--instance-timeout", "3")
    two = live_server_factory("--store", shared_url, "--instance-timeout", "3")
    mark = marker()
    command = f"sleep {mark}; echo ran"
    job_id = start(one, command)["job_id"]
    until(lambda: marked(mark), what="the run")
    followed: list[list[tuple[str, str, str]]] = []
    reader = threading.Thread(target=lambda: followed.append(events(two, job_id)))
    reader.start()
    until(lambda: get(two, f"/api/jobs/{job_id}")["status"] == "running", what="the record")
    os.kill(one.process.pid, signal.SIGKILL)
    one.process.wait(10)
    for process in marked(mark):  # what the killed server left (its watchdog ends it too)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    detail = until(
        lambda: (found := get(two, f"/api/jobs/{job_id}"))["status"] == "failed" and found,
        seconds=15,
        what="the reaper",
    )
    assert detail["error"] == STOPPED
    reader.join(15)
    kind, _, data = followed[0][-1]
    assert (kind, json.loads(data)) == ("error", {"error": STOPPED})
    assert all(job["status"] != "running" for job in get(two, "/api/jobs")["jobs"])
    # The lease is released: the same command runs on the other server at once.
    answer = requests.post(
        two.url + "/api/command", json={"command": command.replace(mark, "0")}, timeout=30
    )
    assert answer.json()["stdout"] == "ran\n"


def test_a_redis_gone_mid_job_answers_the_local_caller_and_fails_the_remote_follower(
    live_server_factory: StartServer, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    one = live_server_factory("--store", redis_url)
    two = live_server_factory("--store", redis_url)
    gate = tmp_path / "gate"
    command = f"echo start; until [ -e {gate} ]; do sleep 0.05; done; echo done"
    job_id = start(one, command)["job_id"]
    until(lambda: get(two, f"/api/jobs/{job_id}")["stdout_bytes"] == 6, what="output")
    followed: list[list[tuple[str, str, str]]] = []
    reader = threading.Thread(target=lambda: followed.append(events(two, job_id)))
    reader.start()
    until(lambda: two.connections() >= 1, what="the follower")
    redis_server.stop()
    try:
        reader.join(30)
        assert followed[0][-1][0] == "error" and "job board" in followed[0][-1][2]
        gate.touch()
        local = until(
            lambda: (found := get(one, f"/api/jobs/{job_id}"))["status"] != "running" and found,
            what="the local end",
        )
        assert local["result"]["stdout"] == "start\ndone\n"
    finally:
        redis_server.start()

    def ended() -> dict[str, Any] | None:
        answer = requests.get(f"{two.url}/api/jobs/{job_id}", timeout=30)
        found = json_object(answer)
        return found if answer.status_code == 200 and found["status"] != "running" else None

    final = until(ended, seconds=20, what="the final record once Redis is back")
    assert final["status"] == "completed"
    assert alive(psutil.Process(one.process.pid))


def test_a_pid_live_on_two_instances_answers_409_naming_both_jobs(
    live_server_factory: StartServer, shared_url: str
) -> None:
    server = live_server_factory("--store", shared_url)
    mark = marker()
    accepted = start(server, f"sleep {mark}")
    job_id, pid = accepted["job_id"], accepted["pid"]
    # Another machine's live run with the same pid, written through the board's own API
    # by an instance that keeps its heartbeat (this test process).
    board = open_board(shared_url, instance_timeout=30, timeout=5, retention=60)
    assert board is not None
    other = JobRecord(
        job_id=uuid.uuid4().hex,
        command="sleep elsewhere",
        cache_key="k" * 64,
        instance=board.instance,
        status="running",
        pid=pid,
        started_at=time.time(),
    )

    async def publish() -> None:
        await board.heartbeat()
        await board.publish(other)
        await board.aclose()

    asyncio.run(publish())
    try:
        for method, route in [
            ("GET", "status"),
            ("POST", "pause"),
            ("POST", "resume"),
            ("POST", "terminate"),
        ]:
            answer = requests.request(
                method, f"{server.url}/api/processes/{route}/{pid}", timeout=30
            )
            assert answer.status_code == 409, (route, answer.text)
            error = json_object(answer)["error"]
            assert job_id in error and other.job_id in error, error
        assert state(mark) != psutil.STATUS_STOPPED  # neither pause nor terminate acted
        listed = get(server, "/api/processes/list")["active_processes"]
        assert str(pid) in listed
    finally:
        post(server, f"/api/jobs/{job_id}/cancel")


def test_a_request_waiting_on_a_killed_servers_run_runs_the_command_itself(
    live_server_factory: StartServer, redis_url: str, tmp_path: Path
) -> None:
    one = live_server_factory("--store", redis_url, "--instance-timeout", "3")
    two = live_server_factory("--store", redis_url, "--instance-timeout", "3")
    gate, mark = tmp_path / "gate", marker()
    command = f"until [ -e {gate} ]; do sleep 0.05; done; echo ran; : {mark}"
    start(one, command)
    until(lambda: marked(mark), what="the run on the first server")
    answers: list[requests.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            requests.post(two.url + "/api/command", json={"command": command}, timeout=60)
        )
    )
    waiting.start()
    # The second server's request waits for the first's run (its job holds no lease).
    until(
        lambda: any(
            job["command"] == command and job["instance"].split(":")[1] == str(two.process.pid)
            for job in get(two, "/api/jobs")["jobs"]
        ),
        what="the joined request's job",
    )
    os.kill(one.process.pid, signal.SIGKILL)
    one.process.wait(10)
    for process in marked(mark):  # what the killed server left
        process.kill()
    until(lambda: not marked(mark), what="the killed server's run to go")
    # Reaped, its lease released: the waiting request takes the lock and runs it itself.
    taken = until(lambda: marked(mark), seconds=20, what="the second server's own run")
    assert all(two.process.pid in {p.pid for p in process.parents()} for process in taken)
    gate.touch()
    waiting.join(30)
    answer = json_object(answers[0])
    assert (answer["stdout"], answer["coalesced"]) == ("ran\n", False)


def test_after_a_redis_restart_the_reaper_waits_for_live_instances_to_beat_again(
    live_server_factory: StartServer, tmp_path: Path
) -> None:
    """Redis comes back with the jobs saved before it went, and every heartbeat expired:
    the first instance back must not reap the others' live jobs before they beat."""
    store = RedisServer(free_port(), tmp_path)
    store.start()
    client = redis.Redis(port=store.port)
    try:
        url = f"{store.url}?namespace=restart"
        one = live_server_factory("--store", url, "--instance-timeout", "5")
        two = live_server_factory("--store", url, "--instance-timeout", "5")
        mark = marker()
        job_id = start(one, f"sleep {mark}")["job_id"]
        until(lambda: get(two, f"/api/jobs/{job_id}")["status"] == "running", what="the record")
        client.save()
        store.stop()
        os.kill(one.process.pid, signal.SIGSTOP)  # silent through the restart
        try:
            time.sleep(5.5)  # the outage outlasts the saved heartbeats (5 s)
            store.start()  # the saved jobs are back; no heartbeat is
            beat = f"runcache:{{restart}}:instance:*:{two.process.pid}:*"
            two_beat = until(lambda: client.keys(beat), what="the second server's heartbeat")[0]
            _renewed(client, two_beat)  # its reaper had a round since
            assert client.hget(f"runcache:{{restart}}:job:{job_id}", "reaped") is None
        finally:
            os.kill(one.process.pid, signal.SIGCONT)
        one_beat = f"runcache:{{restart}}:instance:*:{one.process.pid}:*"
        until(lambda: client.keys(one_beat), what="the first server's heartbeat")
        _renewed(client, two_beat)
        _renewed(client, two_beat)  # past the second server's rest: it reaps again
        assert get(two, f"/api/jobs/{job_id}")["status"] == "running"
        assert post(two, f"/api/jobs/{job_id}/cancel")["status"] == "cancelled"
        until(lambda: not marked(mark), what="the run to go")
    finally:
        client.close()
        store.stop()


def _renewed(client: redis.Redis, key: bytes | str) -> None:
    """Wait for the next renewal of a heartbeat (5 s, renewed every 2 s)."""
    until(lambda: 0 < client.pttl(key) < 3800, what="the heartbeat to age")
    until(lambda: client.pttl(key) > 4200, what="the heartbeat renewed")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_reaper_releases_only_the_lock_its_job_held(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(f"{kind}_url")
    store = open_store(url, max_entries=100, max_bytes=1 << 20)
    board = open_board(url, instance_timeout=30, timeout=5, retention=60)
    assert board is not None
    key = uuid.uuid4().hex

    def dead_job(lease: str) -> JobRecord:
        """A running job of an instance that never beat (so the reaper takes it)."""
        return JobRecord(
            job_id=uuid.uuid4().hex,
            command="true",
            cache_key=key,
            instance=f"gone:1:{uuid.uuid4().hex[:6]}",
            status="running",
            started_at=time.time(),
            cacheable=True,
            lease=lease,
        )

    async def reap(record: JobRecord) -> list[str]:
        await board.publish(record)
        return await board.reap()

    async def scenario() -> None:
        token = store.acquire(key, 60)
        assert token is not None
        # A job whose lock lapsed and was taken by another run: that run keeps it.
        lapsed = dead_job("a token that lapsed")
        assert await reap(lapsed) == [lapsed.job_id]
        assert store.acquire(key, 60) is None
        # The job that holds it: released.
        holder = dead_job(token)
        assert await reap(holder) == [holder.job_id]
        assert store.acquire(key, 60) is not None
        await board.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_a_redis_restarted_empty_gets_the_running_jobs_back(
    live_server_factory: StartServer, tmp_path: Path
) -> None:
    store = RedisServer(free_port(), tmp_path)
    store.start()
    try:
        url = f"{store.url}?namespace=empty"
        one = live_server_factory("--store", url)
        two = live_server_factory("--store", url)
        mark = marker()
        job_id = start(one, f"sleep {mark}")["job_id"]  # prints nothing: no write due
        until(lambda: get(two, f"/api/jobs/{job_id}")["status"] == "running", what="the record")
        store.stop()
        store.start()  # empty
        # The first server finds its heartbeat gone and writes its running jobs again.
        back = until(
            lambda: requests.get(f"{two.url}/api/jobs/{job_id}", timeout=30).status_code == 200,
            what="the job back on the board",
        )
        assert back
        assert get(two, f"/api/jobs/{job_id}")["status"] == "running"
        assert post(two, f"/api/jobs/{job_id}/cancel")["status"] == "cancelled"
        until(lambda: not marked(mark), what="the run to go")
    finally:
        store.stop()
