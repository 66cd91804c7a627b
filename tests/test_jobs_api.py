"""The jobs API against real servers and real commands: following, paging, steering."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker

from conftest import LiveServer, held, until

Json = dict[str, Any]


@pytest.fixture
def server(live_server_factory: Callable[..., LiveServer]) -> LiveServer:
    started: LiveServer = live_server_factory()
    return started


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=15) as client:
        yield client


def _valid(http: httpx.Client, response: httpx.Response, shape: str) -> Json:
    """The answer's JSON, checked against the shape the OpenAPI document names."""
    document = http.get("/openapi.json").json()
    schema = {"$ref": f"#/components/schemas/{shape}", "components": document["components"]}
    body: Json = response.json()
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(body)
    return body


def _background(http: httpx.Client, command: str, **fields: object) -> Json:
    response = http.post("/api/command", json={"command": command, "background": True, **fields})
    assert response.status_code == 202, response.text
    return _valid(http, response, "JobAccepted")


def _job(http: httpx.Client, job_id: str) -> Json:
    return _valid(http, http.get(f"/api/jobs/{job_id}"), "JobDetail")


def _ended(http: httpx.Client, job_id: str) -> Json:
    def ended() -> Json | None:
        job = _job(http, job_id)
        return job if job["status"] not in ("running", "paused") else None

    return until(ended)


def _group(pid: int) -> list[psutil.Process]:
    leader = psutil.Process(pid)
    return [leader, *leader.children(recursive=True)]


def _gated(tmp_path: Path) -> tuple[Path, str]:
    gate = tmp_path / f"gate-{uuid.uuid4().hex}"
    return gate, f"while [ ! -e {gate} ]; do sleep 0.02; done"


def _group_gone(pgid: int) -> bool:
    """No live process is left in the group (zombies waiting to be reaped are dead)."""
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return True


def _alive(process: psutil.Process) -> bool:
    """The process runs still (a zombie, or one already reaped, has ended)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_output_is_read_while_the_command_runs_and_after(
    http: httpx.Client, tmp_path: Path
) -> None:
    gate, wait = _gated(tmp_path)
    accepted = _background(http, f"echo first; echo oops >&2; {wait}; echo second")
    assert accepted["status"] == "running" and accepted["pid"] is not None
    job_id = accepted["job_id"]

    def page() -> Json | None:
        found = _valid(http, http.get(f"/api/jobs/{job_id}/output"), "JobOutput")
        return found if found["data"] else None

    assert until(page) == {
        "data": "first\n",
        "offset": 0,
        "next_offset": 6,
        "total_bytes": 6,
        "eof": False,
    }
    listed = _valid(http, http.get("/api/jobs"), "JobList")["jobs"][0]
    assert listed["job_id"] == job_id and listed["status"] == "running"
    assert "return_code" not in listed and listed["stdout_bytes"] == 6
    assert listed["last_output"] == "first"
    err = http.get(f"/api/jobs/{job_id}/output", params={"stream": "stderr"}).json()
    assert err["data"] == "oops\n"
    gate.touch()
    ended = _ended(http, job_id)
    assert ended["status"] == "completed" and ended["return_code"] == 0
    assert ended["result"]["stdout"] == "first\nsecond\n" and ended["result"]["cached"] is False
    rest = http.get(f"/api/jobs/{job_id}/output", params={"offset": 6}).json()
    assert rest == {
        "data": "second\n",
        "offset": 6,
        "next_offset": 13,
        "total_bytes": 13,
        "eof": True,
    }


def _events(response: httpx.Response) -> Iterator[tuple[str, str | None, str]]:
    """(event, id, data) of each Server-Sent Event, as a client reads them."""
    kind, event_id, data = "message", None, list[str]()
    for line in response.iter_lines():
        if not line:
            yield kind, event_id, "\n".join(data)
            kind, event_id, data = "message", None, list[str]()
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def test_events_follow_the_output_live_then_the_result(http: httpx.Client, tmp_path: Path) -> None:
    gate, wait = _gated(tmp_path)
    job_id = _background(http, f"printf 'one\\ntwo\\n'; {wait}; echo three >&2")["job_id"]
    with http.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
        first = next(events)
        assert first == ("stdout", "8:0", "one\ntwo\n")  # before the command ends
        assert _job(http, job_id)["status"] == "running"
        gate.touch()
        rest = list(events)
    assert rest[0] == ("stderr", "8:6", "three\n")
    kind, _, data = rest[-1]
    assert kind == "result" and len(rest) == 2
    assert json.loads(data)["stderr"] == "three\n"
    # A reader resuming after an event gets exactly what came after it.
    with http.stream(
        "GET", f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": "8:0"}
    ) as response:
        again = list(_events(response))
    assert [event[0] for event in again] == ["stderr", "result"]
    bad = http.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]


def test_pages_never_split_a_utf8_character(http: httpx.Client, tmp_path: Path) -> None:
    text = "aé€😀" * 40
    source = tmp_path / "text"
    source.write_text(text)
    gate, wait = _gated(tmp_path)
    job_id = _background(http, f"cat {source}; {wait}")["job_id"]
    until(lambda: http.get(f"/api/jobs/{job_id}/output").json()["total_bytes"] > 0)

    def read_all(limit: int, start: int = 0) -> str:
        pieces, offset = [], start
        while True:
            page = http.get(
                f"/api/jobs/{job_id}/output", params={"offset": offset, "limit": limit}
            ).json()
            pieces.append(page["data"])
            assert (
                page["offset"] >= offset
                and page["next_offset"] > page["offset"]
                or page["next_offset"] >= page["total_bytes"]
            )
            offset = page["next_offset"]
            if offset >= page["total_bytes"]:
                return "".join(pieces)

    for limit in (1, 2, 3, 5, 7):
        assert read_all(limit) == text  # live, from the capture
    assert read_all(3, start=2) == text[2:]  # 2 is inside "é": the page starts after it
    gate.touch()
    _ended(http, job_id)
    for limit in (1, 3, 6):
        assert read_all(limit) == text  # after the end, from the stored result
    for params, message in (
        ({"stream": "both"}, "stream must be"),
        ({"limit": 0}, "limit must be"),
        ({"limit": 2 << 20}, "limit must"),
        ({"offset": -1}, "offset must be"),
        ({"offset": "5.0"}, "offset must be a whole number"),  # what int("5.0") refuses
        ({"limit": "1e3"}, "limit must be a whole number"),
    ):
        refused = http.get(f"/api/jobs/{job_id}/output", params=params)
        assert refused.status_code == 400 and message in refused.json()["error"]


def test_cancel_kills_the_group_and_answers_every_waiter(
    http: httpx.Client, server: LiveServer
) -> None:
    command = f"sleep 30 & sleep 30; echo never {uuid.uuid4().hex}"
    accepted = _background(http, command)
    pid = accepted["pid"]
    children = until(lambda: _group(pid)[1:])
    answers: list[requests.Response] = []
    misses = http.get("/api/cache/stats").json()["misses"]
    waiter = threading.Thread(
        target=lambda: answers.append(
            requests.post(f"{server.url}/api/command", json={"command": command}, timeout=15)
        )
    )
    waiter.start()
    # Its miss is counted, and the job joined, in one step on the server's loop.
    until(lambda: http.get("/api/cache/stats").json()["misses"] > misses)
    cancelled = http.post(f"/api/jobs/{accepted['job_id']}/cancel")
    assert _valid(http, cancelled, "JobAction") == {
        "success": True,
        "job_id": accepted["job_id"],
        "status": "cancelled",
    }
    waiter.join(15)
    answer = answers[0].json()
    assert (answer["cancelled"], answer["success"], answer["coalesced"]) == (True, False, True)
    # The group was sent SIGKILL; the kernel ends each member a moment later.
    until(lambda: _group_gone(pid), what="the group's end")
    until(lambda: not any(_alive(child) for child in children), what="the children's end")
    assert http.get("/api/cache/stats").json()["size"] == 0  # not cached
    again = http.post(f"/api/jobs/{accepted['job_id']}/cancel")
    assert again.status_code == 409 and "has ended (cancelled)" in again.json()["error"]


def test_pause_stops_every_process_and_paused_time_is_off_the_clock(
    http: httpx.Client,
) -> None:
    # Paused for 2 s of a 1.5 s timeout, with work left after the resume (six 0.1 s sleeps
    # one after another: a sleep that ran out while stopped ends at once, but the ones after
    # it take their time). Counting the paused time would kill it; it must complete.
    command = "for i in 1 2 3 4 5 6; do sleep 0.1; done; echo done"
    accepted = _background(http, command, timeout=1.5, use_cache=False)
    job_id, pid = accepted["job_id"], accepted["pid"]
    until(lambda: len(_group(pid)) >= 2 or None)  # the shell, and its first sleep
    paused = http.post(f"/api/jobs/{job_id}/pause")
    assert _valid(http, paused, "JobAction")["status"] == "paused"
    until(lambda: all(map(held, _group(pid))) or None)
    assert _job(http, job_id)["status"] == "paused"
    twice = http.post(f"/api/jobs/{job_id}/pause")
    assert twice.status_code == 409 and "is paused" in twice.json()["error"]
    time.sleep(2.0)  # past the timeout, but paused
    assert http.post(f"/api/jobs/{job_id}/resume").json()["status"] == "running"
    ended = _ended(http, job_id)
    assert ended["status"] == "completed", ended
    assert ended["result"]["stdout"] == "done\n", ended
    # It ran longer than its timeout by the clock, but part of that was paused.
    assert ended["result"]["timed_out"] is False and ended["result"]["execution_time"] > 1.5
    late = http.post(f"/api/jobs/{job_id}/resume")
    assert late.status_code == 409 and "has ended" in late.json()["error"]


def test_background_runs_join_and_cached_results_answer_at_once(
    http: httpx.Client, tmp_path: Path
) -> None:
    gate, wait = _gated(tmp_path)
    command = f"{wait}; echo done"
    first = _background(http, command)
    second = _background(http, command)
    assert second["job_id"] == first["job_id"]  # an identical request joins the running job
    gate.touch()
    assert _ended(http, first["job_id"])["result"]["stdout"] == "done\n"
    hit = _background(http, command)
    assert hit["status"] == "completed" and hit["pid"] is None
    assert hit["job_id"] != first["job_id"] and hit["cache_key"] == first["cache_key"]
    detail = _job(http, hit["job_id"])
    assert detail["result"]["cached"] is True and detail["return_code"] == 0
    assert detail["stdout_bytes"] == 5 and detail["last_output"] == "done"
    listed = {job["job_id"]: job["cached"] for job in http.get("/api/jobs").json()["jobs"]}
    assert (listed[hit["job_id"]], listed[first["job_id"]]) == (True, False)


def test_unknown_job_is_a_404_json_error(http: httpx.Client) -> None:
    for method, path in (
        ("GET", "/api/jobs/nope"),
        ("GET", "/api/jobs/nope/output"),
        ("GET", "/api/jobs/nope/events"),
        ("POST", "/api/jobs/nope/cancel"),
        ("POST", "/api/jobs/nope/pause"),
        ("POST", "/api/jobs/nope/resume"),
    ):
        response = http.request(method, path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert "no job 'nope' on this server" in response.json()["error"]


def _hang_up_after_posting(server: LiveServer, body: Json) -> None:
    """Send a command request, then close the connection without reading the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )
        until(
            lambda: any(  # the run has started
                job["command"] == body["command"] and job["pid"] is not None
                for job in requests.get(f"{server.url}/api/jobs", timeout=10).json()["jobs"]
            )
        )


def test_the_only_client_of_an_uncached_run_hanging_up_kills_it(
    http: httpx.Client, server: LiveServer
) -> None:
    _hang_up_after_posting(server, {"command": "sleep 30 & sleep 30", "use_cache": False})
    job: Json = until(lambda: http.get("/api/jobs").json()["jobs"])[0]
    assert job["pid"] is not None
    ended = _ended(http, job["job_id"])
    assert ended["status"] == "cancelled" and ended["result"]["cancelled"] is True
    assert _group_gone(job["pid"])


def test_a_cacheable_run_outlives_its_client_and_can_be_joined(
    http: httpx.Client, server: LiveServer
) -> None:
    command = f"sleep 1; echo kept {uuid.uuid4().hex}"
    _hang_up_after_posting(server, {"command": command})
    joined = http.post("/api/command", json={"command": command}).json()
    assert joined["coalesced"] is True and joined["success"] is True
    assert http.post("/api/command", json={"command": command}).json()["cached"] is True


def test_leaving_cancels_a_run_only_when_nobody_else_wants_it(
    http: httpx.Client, tmp_path: Path
) -> None:
    gate, wait = _gated(tmp_path)
    shared = f"{wait}; echo shared {uuid.uuid4().hex}"
    first = _background(http, shared)
    second = _background(http, shared)  # joins: two background requests hold it
    left = http.post(f"/api/jobs/{first['job_id']}/leave")
    assert _valid(http, left, "JobAction")["status"] == "running"  # the other still holds it
    gate.touch()
    assert _ended(http, second["job_id"])["status"] == "completed"

    alone = _background(http, f"sleep 30 & sleep 30; echo {uuid.uuid4().hex}")  # cacheable
    group = until(lambda: _group(alone["pid"])[1:])
    left = http.post(f"/api/jobs/{alone['job_id']}/leave")
    assert left.json()["status"] == "cancelled"  # its only holder left, nobody waits
    assert _group_gone(alone["pid"])
    assert not any(
        process.is_running() and process.status() != psutil.STATUS_ZOMBIE for process in group
    )
    assert http.post("/api/jobs/nope/leave").status_code == 404


def _printing(megabytes: int, last: str) -> str:
    """A command printing ``megabytes`` MB of ``a`` on stdout, then the line ``last``."""
    return f"head -c {megabytes * 1000000} /dev/zero | tr '\\0' a; echo; echo {last}"


def test_finished_jobs_output_stays_within_its_budget_oldest_dropped_first(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory("--job-output-bytes", str(5 * 1000000))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        ids = []
        for index in range(4):  # 2 MB each, one after the other: the budget holds two
            job_id = _background(http, _printing(2, f"last-{index}"), use_cache=False)["job_id"]
            assert _ended(http, job_id)["status"] == "completed"
            ids.append(job_id)
        listed = {job["job_id"]: job for job in http.get("/api/jobs").json()["jobs"]}
        for index, job_id in enumerate(ids):  # every record stays whole
            job = listed[job_id]
            assert (job["stdout_bytes"], job["last_output"], job["return_code"]) == (
                2000000 + len(f"\nlast-{index}\n"),
                f"last-{index}",
                0,
            )
        for job_id in ids[:2]:
            for path in (f"/api/jobs/{job_id}/output", f"/api/jobs/{job_id}/events"):
                gone = http.get(path)
                assert gone.status_code == 410, (path, gone.text)
                assert gone.json() == {
                    "error": (
                        f"the output of job {job_id} was dropped to keep finished jobs' output "
                        "under --job-output-bytes (5000000 bytes); its status stays listed"
                    )
                }
            assert "result" not in http.get(f"/api/jobs/{job_id}").json()
        page = http.get(f"/api/jobs/{ids[3]}/output", params={"offset": 2000000}).json()
        assert (page["data"], page["eof"]) == ("\nlast-3\n", True)
        # Reading a job's output decodes it, which counts too: the one read longest ago goes.
        assert http.get(f"/api/jobs/{ids[2]}/output").status_code == 410
        assert http.get(f"/api/jobs/{ids[3]}/output").status_code == 200


def test_listing_jobs_with_large_outputs_keeps_the_event_loop_responsive(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """40 finished runs that printed 5 MB each: listing them reads none of it, so a
    /livez sent meanwhile waits for no listing (each took 265-787 ms when they decoded)."""
    server = live_server_factory("--max-concurrent", "4")
    with httpx.Client(base_url=server.url, timeout=60) as http:

        def run(index: int) -> None:
            ran = http.post(
                "/api/command", json={"command": _printing(5, f"last-{index}"), "use_cache": False}
            )
            assert ran.status_code == 200, ran.text

        def every_fourth(start: int) -> None:
            for index in range(start, 40, 4):
                run(index)

        workers = [threading.Thread(target=every_fourth, args=(start,)) for start in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(300)
        assert len(http.get("/api/jobs").json()["jobs"]) == 40
        listing = threading.Event()
        lags: list[float] = []

        def list_repeatedly() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as lister:
                for _ in range(15):
                    jobs = lister.get("/api/jobs").json()["jobs"]
                    assert {job["last_output"] for job in jobs} == {
                        f"last-{index}" for index in range(40)
                    }
            listing.set()

        lister = threading.Thread(target=list_repeatedly)
        lister.start()
        while not listing.is_set():
            started = time.monotonic()
            assert http.get("/livez").status_code == 200
            lags.append(time.monotonic() - started)
        lister.join(60)
    assert len(lags) >= 5
    assert max(lags) < 0.25, f"a /livez waited {max(lags) * 1000:.0f} ms behind a listing"
