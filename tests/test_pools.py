"""Worker pools: one ``runcache serve`` and ``runcache worker`` processes of two pools, all
separate processes on one real redis-server. Commands land on their pool's workers
(each sets RUNCACHE_WORKER in its commands' environment), two workers share load,
identical requests join, control from the server reaches a worker, a SIGKILLed
worker's job is failed (or run again with ``retries``) within the claim timeout, a
pool without workers answers 503, and SIGTERM of a worker cancels its runs.

The module's server and its workers of ``alpha`` and ``beta`` serve every test that
does not stop a worker; those that do start workers of a pool of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import psutil
import pytest
import requests

from test_mcp_tasks import Http, _call, _until_status

from conftest import LiveServer, held, json_object, marked, marker, until
from pool_workers import (  # noqa: F401 - deployment_fixture and deployment_watchdogs: fixtures
    Deployment,
    Worker,
    deployment_fixture,
    deployment_watchdogs,
    start_worker,
)

WORKER_STOPPED = "the worker running this job stopped answering"


def post(server: LiveServer, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    answer = requests.post(server.url + "/api/command", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    return json_object(answer)


def job(server: LiveServer, job_id: str) -> dict[str, Any]:
    answer = requests.get(f"{server.url}/api/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return json_object(answer)


def ended(server: LiveServer, job_id: str) -> dict[str, Any] | None:
    found = job(server, job_id)
    return found if found["status"] not in ("running", "paused") else None


def test_commands_land_on_their_pools_workers(deployment: Deployment) -> None:
    alpha = {worker.name for worker in deployment.alpha}
    first = post(deployment.server, {"command": "echo $RUNCACHE_WORKER", "pool": "alpha"})
    assert first["stdout"].strip() in alpha
    ran = post(
        deployment.server,
        {"command": "echo $RUNCACHE_WORKER; env | grep -c ^RUNCACHE_", "pool": "beta"},
    )
    assert ran["stdout"].split() == [deployment.beta.name, "1"]  # no other runcache setting
    # The pool is in the key: the same command on the server itself is another result.
    here = post(deployment.server, {"command": "echo $RUNCACHE_WORKER"})
    assert here["stdout"] == "\n" and not here["cached"]
    again = post(deployment.server, {"command": "echo $RUNCACHE_WORKER", "pool": "alpha"})
    assert again["cached"] and again["stdout"] == first["stdout"]


def test_two_workers_share_a_pools_load(deployment: Deployment) -> None:
    mark = marker()
    started = [
        post(
            deployment.server,
            {
                "command": f"echo $RUNCACHE_WORKER; sleep 1 # {mark} {n}",
                "pool": "alpha",
                "background": True,
            },
            202,
        )
        for n in range(2)
    ]
    done = [until(partial(ended, deployment.server, j["job_id"])) for j in started]
    assert {d["instance"] for d in done} == {w.name for w in deployment.alpha}


def test_identical_requests_join_one_run(deployment: Deployment) -> None:
    command = f"sleep 1; echo $RUNCACHE_WORKER $$ # {marker()}"

    def ask(_: int) -> dict[str, Any]:
        return post(deployment.server, {"command": command, "pool": "alpha"})

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, range(3)))
    assert len({answer["stdout"] for answer in answers}) == 1
    assert sum(not answer["coalesced"] and not answer["cached"] for answer in answers) == 1


def test_cancel_and_pause_from_the_server_reach_the_worker(deployment: Deployment) -> None:
    mark = marker()
    server = deployment.server
    started = post(
        server, {"command": f"sleep 30 # {mark}", "pool": "beta", "background": True}, 202
    )
    job_id = started["job_id"]
    until(lambda: marked(mark), what="the command running on the worker")
    process = marked(mark)[0]
    answer = requests.post(f"{server.url}/api/jobs/{job_id}/pause", timeout=30)
    assert answer.status_code == 200, answer.text
    until(lambda: held(process), what="the run paused")
    assert job(server, job_id)["status"] == "paused"
    answer = requests.post(f"{server.url}/api/jobs/{job_id}/resume", timeout=30)
    assert answer.status_code == 200, answer.text
    until(lambda: process.status() != psutil.STATUS_STOPPED, what="the run resumed")
    answer = requests.post(f"{server.url}/api/jobs/{job_id}/cancel", timeout=30)
    assert answer.status_code == 200, answer.text
    assert until(lambda: ended(server, job_id))["status"] == "cancelled"
    until(lambda: not marked(mark), what="the command killed")


def test_a_job_still_in_its_queue_is_cancelled_at_once_and_never_runs(
    deployment: Deployment,
) -> None:
    """No instance runs a queued job, so none is asked (once, a 503 after seconds): its
    record is ended in the store, its waiting client answered, and the worker that reads
    its entry later drops it."""
    server, busy, waiting, pool = deployment.server, marker(), marker(), "alpha"
    running = [
        post(server, {"command": f"sleep 30 # {busy} {n}", "pool": pool, "background": True}, 202)
        for n in range(2)  # alpha: two workers of concurrency 1, both busy now
    ]
    until(lambda: len(marked(busy)) == 2 or None, what="both alpha workers busy")
    queued = post(
        server, {"command": f"echo {waiting} queued", "pool": "alpha", "background": True}, 202
    )
    with ThreadPoolExecutor(1) as client:
        foreground = client.submit(
            post, server, {"command": f"echo {waiting} waited", "pool": "alpha"}
        )
        waited = until(
            lambda: next(
                (
                    j["job_id"]
                    for j in requests.get(f"{server.url}/api/jobs", timeout=30).json()["jobs"]
                    if j["command"] == f"echo {waiting} waited"
                ),
                None,
            ),
            what="the foreground request's job",
        )
        paused = requests.post(f"{server.url}/api/jobs/{queued['job_id']}/pause", timeout=30)
        assert paused.status_code == 409, paused.text
        assert "waits in the queue of pool 'alpha'" in paused.json()["error"]
        for job_id in (queued["job_id"], waited):
            answer = requests.post(f"{server.url}/api/jobs/{job_id}/cancel", timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "cancelled"
        result = foreground.result(30)
    assert result["cancelled"] is True and result["stdout"] == ""
    # Left by the one background request that wanted it: nobody does, so it is cancelled.
    body = {"command": f"echo {waiting} left", "pool": "alpha", "background": True}
    left = post(server, body, 202)
    answer = requests.post(f"{server.url}/api/jobs/{left['job_id']}/leave", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    assert job(server, queued["job_id"])["status"] == "cancelled"
    for started in running:
        requests.post(f"{server.url}/api/jobs/{started['job_id']}/cancel", timeout=30)
    # The workers, free again, read both entries and drop them: nothing queued, nothing run.
    until(
        lambda: (
            next(
                p
                for p in requests.get(f"{server.url}/api/pools", timeout=30).json()["pools"]
                if p["pool"] == "alpha"
            )["queued"]
            == 0
            or None
        ),
        what="alpha's queue empty",
    )
    assert not any(waiting in line for worker in deployment.alpha for line in worker.output)
    assert job(server, queued["job_id"])["status"] == "cancelled"


def test_mcp_runs_in_a_pool_as_a_call_and_as_a_task(deployment: Deployment) -> None:
    """The pool is an MCP argument as it is a request field: a plain call waits for the
    worker's result; a task (the client declares the extension) ends with it."""
    client = Http(deployment.server)
    arguments: dict[str, Any] = {"command": "echo $RUNCACHE_WORKER; echo mcp", "pool": "beta"}
    plain = _call(client, "execute_command", arguments, meta=None)
    assert plain["structuredContent"]["stdout"] == f"{deployment.beta.name}\nmcp\n"
    arguments["use_cache"] = False
    task = _call(client, "execute_command", arguments)
    assert task["resultType"] == "task", task
    done = _until_status(client, task["taskId"], "completed")
    assert done["result"]["structuredContent"]["stdout"] == f"{deployment.beta.name}\nmcp\n"


def test_a_foreground_client_that_hangs_up_cancels_its_pooled_run(
    deployment: Deployment,
) -> None:
    """As a local run only its own callers wanted: the worker's command is killed."""
    mark, server = marker(), deployment.server
    with pytest.raises(requests.Timeout):  # the client gives up, and its connection closes
        requests.post(
            f"{server.url}/api/command",
            json={"command": f"sleep 30 # {mark}", "pool": "beta"},
            timeout=(10, 1.5),
        )
    until(lambda: not marked(mark), what="the abandoned run killed on the worker")
    listed = requests.get(f"{server.url}/api/jobs", timeout=30).json()["jobs"]
    [abandoned] = [j for j in listed if j["command"] == f"sleep 30 # {mark}"]
    assert until(lambda: ended(server, abandoned["job_id"]))["status"] == "cancelled"


def test_a_pool_without_workers_answers_503_at_once(deployment: Deployment) -> None:
    answer = requests.post(
        deployment.server.url + "/api/command",
        json={"command": "true", "pool": "nobody"},
        timeout=30,
    )
    assert answer.status_code == 503
    assert answer.headers["Retry-After"].isdigit()
    assert "pool 'nobody' has no live worker" in answer.json()["error"]
    # With a redis:// store the schema names pools; a memory store's allows only null.
    document = requests.get(deployment.server.url + "/openapi.json", timeout=30).json()
    pool = document["components"]["schemas"]["CommandRequest"]["properties"]["pool"]
    assert "string" in [option["type"] for option in pool["anyOf"]]


def test_a_worker_needs_redis(tmp_path: Any) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcache",
            "worker",
            "--pool",
            "x",
            "--store",
            f"sqlite://{tmp_path / 'c.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")},
    )
    assert done.returncode != 0
    assert "runcache worker needs a redis:// store (--store)" in done.stdout + done.stderr


def test_a_killed_workers_jobs_fail_or_run_again(deployment: Deployment) -> None:
    pool = "gamma-" + uuid.uuid4().hex[:8]
    mark = marker()
    first = start_worker(deployment.store, pool, "--concurrency", "2")
    second: Worker | None = None
    try:
        once = post(
            deployment.server,
            {"command": f"sleep 30 # {mark} once", "pool": pool, "background": True},
            202,
        )
        again = post(
            deployment.server,
            {
                "command": f"sleep 2; echo $RUNCACHE_WORKER # {mark} again",
                "pool": pool,
                "retries": 1,
                "background": True,
            },
            202,
        )
        until(lambda: len(marked(mark)) >= 2, what="both commands running")
        first.process.kill()
        first.process.wait(10)
        second = start_worker(deployment.store, pool)
        failed = until(lambda: ended(deployment.server, once["job_id"]), seconds=30)
        assert failed["status"] == "failed"
        assert failed["error"] == WORKER_STOPPED
        rerun = until(lambda: ended(deployment.server, again["job_id"]), seconds=30)
        assert rerun["status"] == "completed", rerun
        assert rerun["instance"] == second.name
        for process in marked(mark):  # the dead worker's runs, if its containment left any
            process.kill()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_sigterm_cancels_a_workers_runs_and_exits_0(deployment: Deployment) -> None:
    pool = "delta-" + uuid.uuid4().hex[:8]
    mark = marker()
    worker = start_worker(deployment.store, pool)
    try:
        started = post(
            deployment.server,
            {"command": f"sleep 30 # {mark}", "pool": pool, "background": True},
            202,
        )
        until(lambda: marked(mark), what="the command running")
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(20) == 0
        assert until(lambda: ended(deployment.server, started["job_id"]))["status"] == "cancelled"
        assert not marked(mark)
        assert any("runcache stopping" in line for line in worker.output)
        # Its pool has no live worker now: a 503 at once.
        post(deployment.server, {"command": "true", "pool": pool}, 503)
    finally:
        worker.stop()
