"""What a run may not reach of the server: its settings and tokens, its files (--run-as),
a directory swapped after it was checked; and logs a client cannot wash out."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from runcache.logs import LOGGED_COMMAND_CHARS, loggable

from conftest import Json, LiveServer, json_object, until

TOKEN = "run-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
REDIS_PASSWORD = "redis-password-0123456789"
SERVER_SECRETS = {
    "RUNCACHE_TOKEN": TOKEN,
    "RUNCACHE_ADMIN_TOKEN": ADMIN,
    "RUNCACHE_REDIS_PASSWORD": REDIS_PASSWORD,
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _run(server: LiveServer, command: str, **fields: object) -> Json:
    answer = httpx.post(
        f"{server.url}/api/command",
        headers=AUTH,
        timeout=60,
        json={"command": command, "use_cache": False, **fields},
    )
    assert answer.status_code == 200, answer.text
    return json_object(answer)


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``runcache serve`` expected to refuse to start: its exit and output."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    return subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", *args],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- runcache's own variables ----------------------------------------------------------


def test_a_run_never_sees_runcaches_own_variables_nor_a_token_under_another_name(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={**SERVER_SECRETS, "COPIED_TOKEN": TOKEN, "HARMLESS": "seen"})
    seen = _run(server, 'env; echo "[$RUNCACHE_ADMIN_TOKEN]"')["stdout"]
    assert "HARMLESS=seen" in seen and "[]" in seen
    for secret in (TOKEN, ADMIN, REDIS_PASSWORD):
        assert secret not in seen
    assert not [line for line in seen.splitlines() if line.startswith("RUNCACHE_")]
    # A request's env may not set one either: refused as the server's policy.
    refused = httpx.post(
        f"{server.url}/api/command",
        headers=AUTH,
        timeout=60,
        json={"command": "env", "env": {"RUNCACHE_TOKEN": "x", "A": "1"}},
    )
    assert refused.status_code == 403 and "RUNCACHE_TOKEN" in refused.json()["error"]


def test_env_allow_listing_them_still_shows_them_to_no_run(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    refused = _serve("--env-allow", "PATH,RUNCACHE_TOKEN", env=SERVER_SECRETS)
    assert refused.returncode == 2, refused
    assert refused.stderr.count("\n") == 1 and "RUNCACHE_TOKEN" in refused.stderr
    server = live_server_factory(
        "--env-allow",
        "PATH,COPIED",
        env={**SERVER_SECRETS, "COPIED": ADMIN, "RUNCACHE_STORE": "memory://"},
    )
    seen = _run(server, "env")["stdout"]
    assert "PATH=" in seen and ADMIN not in seen and "RUNCACHE_" not in seen
    assert not [line for line in seen.splitlines() if not line.startswith(("PATH=", "PWD="))]
    refused_env = httpx.post(
        f"{server.url}/api/command",
        headers=AUTH,
        timeout=60,
        json={"command": "env", "env": {"RUNCACHE_REDIS_PASSWORD": "x"}},
    )
    assert refused_env.status_code == 403


# -- --run-as ------------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is in a 0700 one, which alone
    would keep another user from every file in it)."""
    made = Path(tempfile.mkdtemp(prefix="runcache-secrets-", dir="/tmp"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made)


def test_run_as_keeps_the_servers_files_out_of_a_runs_reach(
    live_server_factory: Callable[..., LiveServer], open_dir: Path
) -> None:
    tmp_path = open_dir
    nobody = pwd.getpwnam("nobody")
    token_file, audit, store = tmp_path / "token", tmp_path / "audit.log", tmp_path / "c.db"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    server = live_server_factory(
        "--run-as",
        "nobody",
        "--token-file",
        str(token_file),
        "--audit-log",
        str(audit),
        "--store",
        f"sqlite://{store}",
        "--max-open-files",
        "64",
        "--max-processes",
        "300",
        env={"RUNCACHE_ADMIN_TOKEN": ADMIN, "HOME": "/root", "USER": "root"},
    )
    ids = _run(server, "id -u; id -g; id -G; echo $HOME $USER; ulimit -n")["stdout"].split()
    assert ids == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        str(nobody.pw_gid),
        nobody.pw_dir,
        "nobody",
        "64",
    ]
    assert _run(server, "true", use_cache=True)["return_code"] == 0  # the store's file made
    server_pid = server.process.pid
    for secret in (token_file, audit, store):
        assert secret.exists()
        result = _run(server, f"cat {secret}")
        assert result["return_code"] != 0, secret
        assert "Permission denied" in result["stderr"] and TOKEN not in result["stdout"]
    # The server's own process: not even there in the run's /proc (its PID namespace's).
    environ = Path(f"/proc/{server_pid}/environ")
    result = _run(server, f"cat {environ}")
    assert environ.exists() and result["return_code"] != 0 and TOKEN not in result["stdout"]
    assert "No such file" in result["stderr"] or "Permission denied" in result["stderr"]
    # What the run is given stays usable: its stdin, its pipes reopened, its directory.
    given = _run(
        server,
        "cat /dev/stdin; echo out > /dev/stdout; echo err > /dev/stderr; pwd",
        stdin="fed\n",
        cwd=str(tmp_path),
    )
    assert (given["return_code"], given["stdout"], given["stderr"]) == (
        0,
        f"fed\nout\n{tmp_path}\n",
        "err\n",
    ), given


def test_run_as_needs_root_and_a_known_user() -> None:
    unknown = _serve("--run-as", "no-such-user-here")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown
    assert "no user 'no-such-user-here'" in unknown.stderr
    # The server's code is loaded as root (Python lives under /root here), then it gives up
    # root and starts, as a server started by another user would.
    code = (
        "import os, sys, runcache.cli, runcache.web.server, runcache.engine.engine; "
        "os.setegid(65534); os.seteuid(65534); "
        "sys.argv = ['runcache', 'serve', '--port', '0', '--run-as', 'nobody']; "
        "runcache.cli.main()"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    as_nobody = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert as_nobody.returncode == 2 and as_nobody.stderr.count("\n") == 1, as_nobody
    assert "needs runcache to run as root" in as_nobody.stderr


# -- a checked directory swapped while its run waits ------------------------------------------


def test_a_run_enters_the_directory_checked_not_a_link_swapped_in_while_it_waited(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    checked = root / "work"
    checked.mkdir(parents=True)
    (checked / "original-content").write_text("")
    go = tmp_path / "go"
    server = live_server_factory("--allow-cwd", str(root), "--max-concurrent", "1")
    headers = {**AUTH}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as http:
        first = http.post(
            "/api/command",
            json={
                "command": f"until [ -e {go} ]; do sleep 0.02; done",
                "background": True,
                "use_cache": False,
            },
        )
        assert first.status_code == 202, first.text
        second = http.post(
            "/api/command",
            json={
                "command": "pwd -P; ls",
                "cwd": str(checked),
                "background": True,
                "use_cache": False,
            },
        )
        assert second.status_code == 202, second.text  # checked: waiting for the slot
        checked.rename(root / "moved")
        checked.symlink_to("/etc")
        go.touch()

        def ended() -> Json | None:
            job = json_object(http.get(f"/api/jobs/{second.json()['job_id']}"))
            return job if job["status"] not in ("running", "paused") else None

        job = until(ended, 30)
    lines = job["result"]["stdout"].splitlines()
    assert lines[0] == str(root / "moved") and "original-content" in lines, job
    assert "passwd" not in lines


# -- logs a client cannot wash out ------------------------------------------------------------


def test_huge_commands_grow_the_logs_by_a_bounded_amount(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    server = live_server_factory("--audit-log", str(audit))
    _run(server, "echo first-line-to-keep")
    logged_before = sum(len(line) for line in server.output)
    filler = "x" * (1000 * 1000)
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:

        def send(start: int) -> None:
            for number in range(start, 65, 4):
                answer = http.post("/api/command", json={"command": f": {number} {filler}; true"})
                assert answer.status_code == 200, answer.text

        threads = [threading.Thread(target=send, args=(start,)) for start in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    until(lambda: audit.read_text().count('"command"') >= 66, what="for the audit lines")
    server.stop()
    files = sorted(tmp_path.glob("audit.log*"))
    assert sum(path.stat().st_size for path in files) < 66 * 2 * LOGGED_COMMAND_CHARS
    assert "first-line-to-keep" in audit.read_text()
    assert sum(len(line) for line in server.output) - logged_before < 66 * 2 * LOGGED_COMMAND_CHARS


def test_a_cut_command_keeps_two_long_commands_apart() -> None:
    one, two = "a" * 5000 + "1", "a" * 5000 + "2"
    assert loggable("short") == "short"
    cut_one, cut_two = loggable(one), loggable(two)
    assert cut_one != cut_two and len(cut_one) < LOGGED_COMMAND_CHARS + 60
    assert cut_one.startswith("a" * LOGGED_COMMAND_CHARS + "… [+4001 chars, sha256 ")
