"""Owners: with tokens set, a plain token sees and steers only the jobs it started or joined.

Real servers with a token file of two plain tokens (one named, one not) and an
admin token; every job route, every process route and the MCP tools over ``/mcp``
are asked for another's job, and must answer as for a job that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest

from runcache.config import Config
from runcache.errors import ConfigError
from test_mcp import http_session

from conftest import LiveServer, marked, marker, until

Json = dict[str, Any]

TOKEN_A, TOKEN_B, ADMIN = "alpha-" + "a" * 26, "bravo-" + "b" * 26, "admin-" + "c" * 26
#: B's token has no name in the file: it is known by a digest of it.
B = "token-" + hashlib.sha256(TOKEN_B.encode()).hexdigest()[:12]

JOB_ROUTES = [
    ("GET", ""),
    ("GET", "/output"),
    ("GET", "/events"),
    ("POST", "/cancel"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/leave"),
]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# the team's tokens\n\nalice {TOKEN_A}\n   \n{TOKEN_B}\n")
    return path


@pytest.fixture
def server(
    live_server_factory: Callable[..., LiveServer], token_file: Path, tmp_path: Path
) -> LiveServer:
    started: LiveServer = live_server_factory(
        "--token-file",
        str(token_file),
        "--audit-log",
        str(tmp_path / "audit.log"),
        "--mcp-tools",
        "all",  # the process tools too: they follow the owners' rule as well
        env={"RUNCACHE_ADMIN_TOKEN": ADMIN},
    )
    return started


@pytest.fixture
def clients(server: LiveServer) -> Iterator[dict[str, httpx.Client]]:
    """An HTTP client per token: ``a``, ``b`` and ``admin``."""
    made = {
        name: httpx.Client(
            base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {token}"}
        )
        for name, token in (("a", TOKEN_A), ("b", TOKEN_B), ("admin", ADMIN))
    }
    yield made
    for client in made.values():
        client.close()


def _start(client: httpx.Client, command: str, **fields: object) -> Json:
    response = client.post("/api/command", json={"command": command, "background": True, **fields})
    assert response.status_code == 202, response.text
    accepted: Json = response.json()
    return accepted


def _running(client: httpx.Client, job_id: str) -> Json:
    """The job once its command has started (its pid known)."""

    def started() -> Json | None:
        job: Json = client.get(f"/api/jobs/{job_id}").json()
        return job if job["pid"] is not None else None

    return until(started)


def _job_ids(client: httpx.Client) -> set[str]:
    return {job["job_id"] for job in client.get("/api/jobs").json()["jobs"]}


def _pids(client: httpx.Client) -> tuple[set[int], set[int]]:
    """The pids that ``/api/processes/list`` and ``/api/processes/dashboard`` show."""
    listed = {int(pid) for pid in client.get("/api/processes/list").json()["active_processes"]}
    board = client.get("/api/processes/dashboard").json()["processes"]
    return listed, {entry["pid"] for entry in board}


def _unknown_job(client: httpx.Client, job_id: str, method: str, suffix: str) -> Json:
    """What ``client`` hears of ``job_id`` on a job route: must be an unknown job's 404."""
    response = client.request(method, f"/api/jobs/{job_id}{suffix}")
    assert response.status_code == 404, (method, suffix, response.text)
    answer: Json = response.json()
    return answer


def test_a_plain_token_cannot_see_or_steer_anothers_job_and_the_admin_can(
    clients: dict[str, httpx.Client],
) -> None:
    a, b, admin = clients["a"], clients["b"], clients["admin"]
    mark = marker()
    job_id = _start(a, f"echo started; sleep {mark}", use_cache=False)["job_id"]
    pid = _running(a, job_id)["pid"]
    unknown_id = "0" * 32
    unknown = _unknown_job(b, unknown_id, "GET", "")

    for method, suffix in JOB_ROUTES:
        answer = _unknown_job(b, job_id, method, suffix)
        assert answer == {"error": unknown["error"].replace(unknown_id, job_id)}
    assert b.get(f"/api/process/get-task-result/{job_id}").json() == {"error": "Task not found"}
    status = b.get(f"/api/processes/status/{pid}")
    assert (status.status_code, status.json()) == (
        404,
        {"success": False, "error": f"Process {pid} not found"},
    )
    for verb in ("terminate", "pause", "resume"):
        steered = b.post(f"/api/processes/{verb}/{pid}")
        assert (steered.status_code, steered.json()) == (
            404,
            {"success": False, "error": f"Failed to {verb} process {pid} or process not found"},
        )

    assert job_id not in _job_ids(b) and _pids(b) == (set(), set())
    assert job_id in _job_ids(a) and job_id in _job_ids(admin)
    assert _pids(a) == _pids(admin) == ({pid}, {pid})
    assert a.get(f"/api/jobs/{job_id}").json()["status"] == "running"  # B changed nothing
    assert marked(mark)  # still running
    assert a.get(f"/api/process/get-task-result/{job_id}").json()["result"]["status"] == ("running")

    cancelled = admin.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.json() == {"success": True, "job_id": job_id, "status": "cancelled"}
    assert a.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"
    until(lambda: not marked(mark))


def test_the_admins_job_is_hidden_from_the_plain_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """The single RUNCACHE_TOKEN of old, beside an admin token: the plain token no longer
    reads or cancels what the admin runs."""
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN_A, "RUNCACHE_ADMIN_TOKEN": ADMIN})
    with (
        httpx.Client(
            base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as admin,
        httpx.Client(
            base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {TOKEN_A}"}
        ) as plain,
    ):
        mark = marker()
        job_id = _start(admin, f"sleep {mark}", use_cache=False)["job_id"]
        pid = _running(admin, job_id)["pid"]
        assert plain.post(f"/api/jobs/{job_id}/cancel").status_code == 404
        assert plain.post(f"/api/processes/terminate/{pid}").status_code == 404
        assert job_id not in _job_ids(plain) and _pids(plain) == (set(), set())
        own = _start(plain, "echo mine")["job_id"]
        assert own in _job_ids(plain) and own in _job_ids(admin)
        assert marked(mark)  # still running
        assert admin.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        until(lambda: not marked(mark))


def test_joining_an_identical_run_makes_it_the_joiners_too(
    clients: dict[str, httpx.Client],
    tmp_path: Path,
) -> None:
    a, b = clients["a"], clients["b"]
    gate = tmp_path / "gate"
    command = f"echo joined; while [ ! -e {gate} ]; do sleep 0.01; done"
    job_id = _start(a, command)["job_id"]
    _running(a, job_id)
    assert b.get(f"/api/jobs/{job_id}").status_code == 404
    assert _start(b, command)["job_id"] == job_id  # an identical cacheable run: joined
    assert b.get(f"/api/jobs/{job_id}").json()["status"] == "running"
    assert job_id in _job_ids(b)
    gate.touch()
    until(lambda: b.get(f"/api/jobs/{job_id}").json()["status"] == "completed")
    page = b.get(f"/api/jobs/{job_id}/output").json()
    assert page["data"] == "joined\n"


def test_the_audit_log_names_each_tokens_identity(
    clients: dict[str, httpx.Client],
    server: LiveServer,
    tmp_path: Path,
) -> None:
    for name in ("a", "b", "admin"):
        assert (
            clients[name].post("/api/command", json={"command": f"echo {name}"}).status_code == 200
        )
    audit = tmp_path / "audit.log"
    until(lambda: audit.read_text().count("\n") >= 3)
    records = [orjson.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["command"], r["credential"], r["identity"]) for r in records] == [
        ("echo a", "token", "alice"),
        ("echo b", "token", B),
        ("echo admin", "admin", "admin"),
    ]
    for secret in (TOKEN_A, TOKEN_B, ADMIN):
        assert secret not in audit.read_text()


async def _tool(session: Any, name: str, **arguments: Any) -> tuple[bool, str]:
    result = await session.call_tool(name, arguments)
    return result.is_error, result.content[0].text


def test_mcp_tools_over_http_follow_the_same_rule(
    clients: dict[str, httpx.Client],
    server: LiveServer,
) -> None:
    a = clients["a"]
    mark = marker()
    job_id = _start(a, f"echo started; sleep {mark}", use_cache=False)["job_id"]
    pid = _running(a, job_id)["pid"]

    async def as_b() -> None:
        async with http_session(server.url, TOKEN_B) as session:
            for tool, arguments in (
                ("job_status", {"job_id": job_id}),
                ("read_output", {"job_id": job_id}),
                ("cancel_job", {"job_id": job_id}),
            ):
                failed, text = await _tool(session, tool, **arguments)
                assert failed and f"no job {job_id!r} on this server" in text, (tool, text)
            failed, text = await _tool(session, "get_process_status", pid=pid)
            assert failed and text.endswith(f"Process {pid} not found")
            for verb in ("terminate", "pause", "resume"):
                failed, text = await _tool(session, f"{verb}_process", pid=pid)
                assert failed and text.endswith(
                    f"Failed to {verb} process {pid} or process not found"
                )
            failed, text = await _tool(session, "list_active_processes")
            assert not failed and orjson.loads(text)["total_count"] == 0
            failed, text = await _tool(session, "get_process_dashboard")
            assert not failed and orjson.loads(text)["processes"] == []
            # B's own run over MCP is B's: A does not see it.
            failed, text = await _tool(session, "start_command", command="echo b-over-mcp")
            assert not failed
            own = orjson.loads(text)["job_id"]
            failed, text = await _tool(session, "job_status", job_id=own)
            assert not failed and orjson.loads(text)["job_id"] == own
            assert a.get(f"/api/jobs/{own}").status_code == 404

        async with http_session(server.url, TOKEN_A) as session:
            failed, text = await _tool(session, "job_status", job_id=job_id)
            assert not failed and orjson.loads(text)["status"] == "running"
            failed, text = await _tool(session, "list_active_processes")
            assert not failed and list(orjson.loads(text)["active_processes"]) == [str(pid)]

        async with http_session(server.url, ADMIN) as session:
            failed, text = await _tool(session, "cancel_job", job_id=job_id)
            assert not failed and orjson.loads(text)["status"] == "cancelled"

    anyio.run(as_b)
    until(lambda: not marked(mark))


# -- the token file ------------------------------------------------------------------------


def test_a_token_file_names_its_tokens_and_skips_comments(token_file: Path) -> None:
    config = Config.load({"token_file": str(token_file)}, environ={"RUNCACHE_ADMIN_TOKEN": ADMIN})
    assert config.plain_tokens == (("alice", TOKEN_A), (B, TOKEN_B))
    assert config.admin_secret == ADMIN
    assert TOKEN_A not in repr(config) and TOKEN_B not in repr(config)
    one = Config.load(environ={"RUNCACHE_TOKEN": TOKEN_A})
    assert one.plain_tokens == (
        ("token-" + hashlib.sha256(TOKEN_A.encode()).hexdigest()[:12], TOKEN_A),
    )
    assert one.admin_secret == TOKEN_A


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{TOKEN_A}\n{TOKEN_B}\n", "holds several tokens, so none of them is the admin's"),
        (f"a {TOKEN_A} extra\n", "token_file line 1: write `name token` or `token`"),
        ("# first\nbob short\n", "token_file line 2: the token must be at least 16"),
        (f"{TOKEN_A} {TOKEN_B}\n", "token_file line 1: a name is 1 to 15 letters"),
        (f"admin {TOKEN_A}\n", "and not admin or anonymous"),
        (f"bob {TOKEN_A}\nbob {TOKEN_B}\n", "token_file line 2: a name or token already given"),
        (f"bob {TOKEN_A}\ncarol {TOKEN_A}\n", "token_file line 2: a name or token already given"),
        ("# nothing but a comment\n\n", "token_file holds no token"),
    ],
)
def test_bad_token_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load({"token_file": str(path)}, environ={})
