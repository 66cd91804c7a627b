"""The client commands, run as the real ``runcache`` executable."""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import click
import orjson
import psutil
import pytest
import requests
from click.testing import CliRunner

from runcache.cli import cli
from runcache.config import GROUPS, settings
from runcache.stores import open_store

from conftest import LiveServer, free_port, marked, marker, until

#: The console script pip installed beside this Python.
RUNCACHE = Path(sys.executable).with_name("runcache")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's ``runcache run`` without a server caches under its own directory,
    never in the user's ``~/.cache/runcache``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def runcache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``runcache`` with none of the caller's RUNCACHE_* settings, plus ``env``."""
    assert RUNCACHE.exists(), f"{RUNCACHE} is missing: run pip install -e '.[test]'"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    environment.update(env or {})
    return subprocess.run(
        [str(RUNCACHE), *args], capture_output=True, env=environment, timeout=60, check=False
    )


def test_run_passes_the_exit_code_and_keeps_streams_apart() -> None:
    done = runcache("run", "--", "sh", "-c", "printf out; printf err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out", b"err")


def test_run_writes_output_exactly_as_the_command_did() -> None:
    done = runcache("run", "--", "printf", "a  b\\n\\nč\\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "a  b\n\nč\n".encode(), b"")


def test_run_quotes_arguments_so_the_shell_does_not_split_or_expand_them() -> None:
    done = runcache("run", "--", "echo", "$HOME", "a;b", "x y")
    assert done.stdout == b"$HOME a;b x y\n"


def test_a_timed_out_command_exits_124_and_says_so() -> None:
    done = runcache("run", "--timeout", "0.5", "--", "sleep", "30")
    assert done.returncode == 124
    assert done.stderr == b"runcache: the command timed out and was killed\n"


def test_a_command_killed_by_a_signal_exits_128_plus_the_signal() -> None:
    # A fault, not `kill $$`: the command is PID 1 of its own namespace, which a signal
    # it does not handle, sent from inside, leaves alone.
    done = runcache("run", "--", "exec", "python3", "-c", "import ctypes; ctypes.string_at(0)")
    assert done.returncode == 128 + 11


def test_terminating_run_kills_the_command_it_runs_in_process(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    # Found by its argument from here: in its namespaces a run sees only its own pids.
    mark = marker()
    process = subprocess.Popen([str(RUNCACHE), "run", "--", "sleep", mark], env=environment)

    def started() -> list[psutil.Process] | bool:
        """The command's process once it runs, or True once ``runcache run`` has ended."""
        return [found for found in marked(mark) if found.name() == "sleep"] or (
            process.poll() is not None
        )

    found = until(started)
    assert process.poll() is None, "runcache run ended before its command started"
    assert isinstance(found, list)
    [command] = found
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 128 + signal.SIGTERM
    # The command runs in a session of its own, so only runcache could have killed it.
    assert _gone(command)


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_bad_option_value_is_one_line_and_exit_2() -> None:
    done = runcache("run", "--timeout", "0", "--", "true")
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == b"runcache: timeout must be greater than 0 seconds\n"


def test_through_a_server_the_second_run_is_a_hit(live_server: LiveServer) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    first = runcache("run", "--", "sh", "-c", "cat /proc/sys/kernel/random/uuid", env=env)
    second = runcache("run", "--", "sh", "-c", "cat /proc/sys/kernel/random/uuid", env=env)
    fresh = runcache(
        "run", "--no-cache", "--", "sh", "-c", "cat /proc/sys/kernel/random/uuid", env=env
    )
    assert first.returncode == second.returncode == fresh.returncode == 0
    assert first.stdout == second.stdout != fresh.stdout
    stats = orjson.loads(runcache("stats", "--json", "--server", live_server.url).stdout)
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 1, 1)


def test_run_refresh_runs_again_and_the_next_run_hits_the_new_result(
    live_server: LiveServer, tmp_path: Path
) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    runs = tmp_path / "runs"
    command = ("sh", "-c", f"echo run >> {runs}; wc -l < {runs}")
    assert runcache("run", "--", *command, env=env).stdout == b"1\n"
    assert runcache("run", "--", *command, env=env).stdout == b"1\n"  # a hit
    assert runcache("run", "--refresh", "--", *command, env=env).stdout == b"2\n"
    assert runcache("run", "--", *command, env=env).stdout == b"2\n"  # the new result
    both = runcache("run", "--refresh", "--no-cache", "--", *command, env=env)
    assert both.returncode == 2 and b"refresh stores the new result" in both.stderr


def test_stats_prints_a_table(live_server: LiveServer) -> None:
    runcache("run", "--server", live_server.url, "--", "true")
    done = runcache("stats", "--server", live_server.url)
    rows = dict(line.split(None, 1) for line in done.stdout.decode().splitlines())
    assert done.returncode == 0
    assert (rows["size"], rows["misses"], rows["hit_rate"]) == ("1", "1", "0.0%")


def test_clear_clears_and_says_so(live_server: LiveServer) -> None:
    runcache("run", "--server", live_server.url, "--", "true")
    done = runcache("clear", "--server", live_server.url)
    assert (done.returncode, done.stdout) == (0, b"Cache cleared\n")
    stats = orjson.loads(runcache("stats", "--json", "--server", live_server.url).stdout)
    assert stats["size"] == 0


@pytest.mark.parametrize(
    "args", [("run", "--", "true"), ("stats",), ("stats", "--json"), ("clear",)]
)
def test_a_server_that_is_down_is_one_line_naming_the_url_and_exit_2(args: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = runcache(*args, env={"RUNCACHE_URL": url})
    assert (done.returncode, done.stdout) == (2, b"")
    expected = f"runcache: cannot reach a runcache server at {url}: Connection refused\n"
    assert done.stderr.decode() == expected


def test_tokens_come_from_the_environment(live_server_factory: Callable[..., LiveServer]) -> None:
    token, admin = "u" * 20, "v" * 20
    server = live_server_factory(env={"RUNCACHE_TOKEN": token, "RUNCACHE_ADMIN_TOKEN": admin})
    refused = runcache("run", "--server", server.url, "--", "true")
    assert refused.returncode == 2 and b"needs a token" in refused.stderr
    env = {"RUNCACHE_URL": server.url, "RUNCACHE_TOKEN": token}
    assert runcache("run", "--", "true", env=env).returncode == 0
    assert b"needs the admin token" in runcache("clear", env=env).stderr
    cleared = runcache("clear", env={**env, "RUNCACHE_ADMIN_TOKEN": admin})
    assert (cleared.returncode, cleared.stdout) == (0, b"Cache cleared\n")


# -- long runs: live output, Ctrl-C, jobs --------------------------------------------


SpawnCli = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn_cli() -> Iterator[SpawnCli]:
    """Starts ``runcache ARGS…`` with its output piped; at teardown, whatever a
    failed test left running is killed and every pipe closed, so a leaked
    descriptor never fails a later test with a ResourceWarning."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, server: LiveServer | None = None) -> subprocess.Popen[bytes]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
        if server is not None:
            environment["RUNCACHE_URL"] = server.url
        process = subprocess.Popen(
            [str(RUNCACHE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment
        )
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _read_line(stream: IO[bytes], seconds: float = 15.0) -> bytes:
    """One line of a child's output, failing (not hanging) if none comes in time."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, "no output in time"
    return stream.readline()


@pytest.mark.parametrize("through", ["server", "in-process"])
def test_run_prints_output_while_the_command_runs(
    through: str, request: pytest.FixtureRequest, tmp_path: Path, spawn_cli: SpawnCli
) -> None:
    server = request.getfixturevalue("live_server") if through == "server" else None
    gate = tmp_path / "gate"
    process = spawn_cli(
        "run",
        "--",
        "sh",
        "-c",
        f"echo first; echo warn >&2; while [ ! -e {gate} ]; "
        "do sleep 0.02; done; printf 'second\\r\\n'; exit 5",
        server=server,
    )
    assert process.stdout is not None and process.stderr is not None
    assert _read_line(process.stdout) == b"first\n"  # while the command waits on its gate
    assert _read_line(process.stderr) == b"warn\n"
    gate.touch()
    assert process.wait(30) == 5
    assert process.stdout.read() == b"second\r\n"  # byte for byte, the CR kept


def _ctrl_c(spawn_cli: SpawnCli, server: LiveServer, command: str) -> tuple[int, bytes]:
    """Start ``runcache run`` on ``command``, wait for its first line, press Ctrl-C."""
    process = spawn_cli("run", "--", "sh", "-c", command, server=server)
    assert process.stdout is not None
    assert _read_line(process.stdout) == b"started\n"
    process.send_signal(signal.SIGINT)
    code = process.wait(30)
    stderr = process.communicate(timeout=10)[1]
    return code, stderr


def test_ctrl_c_cancels_a_run_only_it_wanted(
    live_server: LiveServer, tmp_path: Path, spawn_cli: SpawnCli
) -> None:
    pid_file = tmp_path / "pid"
    code, stderr = _ctrl_c(
        spawn_cli,
        live_server,
        f"echo $$ > {pid_file}; echo started; sleep 60 & sleep 60 # {uuid.uuid4().hex}",
    )
    assert (code, stderr) == (130, b"runcache: cancelled\n")
    assert _group_gone(int(pid_file.read_text()))


def test_sigterm_cancels_a_run_and_exits_143(live_server: LiveServer, spawn_cli: SpawnCli) -> None:
    process = spawn_cli(
        "run", "--", "sh", "-c", f"echo started; sleep 60 # {uuid.uuid4().hex}", server=live_server
    )
    assert process.stdout is not None
    assert _read_line(process.stdout) == b"started\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 143
    assert process.communicate(timeout=10)[1] == b"runcache: cancelled\n"


def test_a_run_another_client_cancels_exits_137_and_says_who(
    live_server: LiveServer, spawn_cli: SpawnCli
) -> None:
    marker = uuid.uuid4().hex
    process = spawn_cli(
        "run", "--", "sh", "-c", f"echo started; sleep 60 # {marker}", server=live_server
    )
    assert process.stdout is not None
    assert _read_line(process.stdout) == b"started\n"
    jobs = requests.get(f"{live_server.url}/api/jobs", timeout=5).json()["jobs"]
    [job] = [job for job in jobs if marker in job["command"]]
    cancelled = requests.post(f"{live_server.url}/api/jobs/{job['job_id']}/cancel", timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert process.wait(30) == 137
    assert process.communicate(timeout=10)[1] == (
        b"runcache: the run was cancelled by another client\n"
    )


def test_ctrl_c_leaves_a_run_another_client_waits_on(
    live_server: LiveServer, tmp_path: Path, spawn_cli: SpawnCli
) -> None:
    gate = tmp_path / "gate"
    command = f"echo started; while [ ! -e {gate} ]; do sleep 0.02; done; echo done"
    answers: list[requests.Response] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            requests.post(
                f"{live_server.url}/api/command",
                json={"command": shlex.join(["sh", "-c", command])},
                timeout=30,
            )
        )
    )
    waiter.start()
    until(lambda: requests.get(f"{live_server.url}/api/jobs", timeout=5).json()["jobs"])
    code, stderr = _ctrl_c(spawn_cli, live_server, command)
    assert (code, stderr) == (130, b"runcache: left the run to the other clients waiting on it\n")
    gate.touch()
    waiter.join(30)
    assert answers[0].json()["stdout"] == "started\ndone\n"


def test_jobs_lists_prints_follows_and_cancels(
    live_server: LiveServer, tmp_path: Path, spawn_cli: SpawnCli
) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    gate = tmp_path / "gate"
    marker = uuid.uuid4().hex
    job = requests.post(
        f"{live_server.url}/api/command",
        timeout=10,
        json={
            "command": f"echo one {marker}; while [ ! -e {gate} ]; do sleep 0.02; done; echo two",
            "background": True,
        },
    ).json()
    until(
        lambda: requests.get(f"{live_server.url}/api/jobs/{job['job_id']}", timeout=5).json()[
            "stdout_bytes"
        ]
    )
    listing = runcache("jobs", env=env)
    assert listing.returncode == 0
    line = next(row for row in listing.stdout.decode().splitlines() if job["job_id"] in row)
    assert "running" in line and marker in line
    so_far = runcache("jobs", "logs", job["job_id"], env=env)
    assert (so_far.returncode, so_far.stdout) == (0, f"one {marker}\n".encode())
    follower = spawn_cli("jobs", "logs", "--follow", job["job_id"], server=live_server)
    assert follower.stdout is not None
    assert _read_line(follower.stdout) == f"one {marker}\n".encode()
    gate.touch()
    assert follower.wait(30) == 0
    assert follower.communicate(timeout=10)[0] == b"two\n"
    slow = requests.post(
        f"{live_server.url}/api/command",
        timeout=10,
        json={"command": "sleep 60", "use_cache": False, "background": True},
    ).json()
    cancelled = runcache("jobs", "cancel", slow["job_id"], env=env)
    assert cancelled.stdout == f"job {slow['job_id']} cancelled\n".encode()
    again = runcache("jobs", "cancel", slow["job_id"], env=env)
    assert again.returncode == 2 and again.stderr.count(b"\n") == 1
    assert b"cannot be cancelled: it has ended (cancelled)" in again.stderr
    for verb in ("logs", "cancel"):
        unknown = runcache("jobs", verb, "nope", env=env)
        assert (unknown.returncode, unknown.stdout) == (2, b"")
        assert unknown.stderr.startswith(b"runcache: no job 'nope' on this server")
        assert unknown.stderr.count(b"\n") == 1
    nowhere = runcache("jobs")
    assert nowhere.returncode == 2 and b"give --server URL or set RUNCACHE_URL" in nowhere.stderr


def test_jobs_json_and_logs_of_one_stream(live_server: LiveServer) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    marker = uuid.uuid4().hex
    job = requests.post(
        f"{live_server.url}/api/command",
        timeout=10,
        json={
            "command": f"printf 'out {marker}\\r\\n'; printf 'err {marker}' >&2",
            "background": True,
        },
    ).json()
    until(
        lambda: (
            requests.get(f"{live_server.url}/api/jobs/{job['job_id']}", timeout=5).json()["status"]
            == "completed"
        )
    )
    listed = orjson.loads(runcache("jobs", "--json", env=env).stdout)["jobs"]
    found = next(record for record in listed if record["job_id"] == job["job_id"])
    assert (found["status"], found["return_code"], found["stderr_bytes"]) == (
        "completed",
        0,
        len(f"err {marker}"),
    )
    err_only = runcache("jobs", "logs", "--stream", "stderr", job["job_id"], env=env)
    assert (err_only.returncode, err_only.stdout, err_only.stderr) == (
        0,
        b"",
        f"err {marker}".encode(),
    )
    both = runcache("jobs", "logs", job["job_id"], env=env)
    assert (both.stdout, both.stderr) == (f"out {marker}\r\n".encode(), f"err {marker}".encode())


def test_logs_follow_one_stream_live_while_the_other_grows(
    live_server: LiveServer, tmp_path: Path, spawn_cli: SpawnCli
) -> None:
    gate = tmp_path / "gate"
    job = requests.post(
        f"{live_server.url}/api/command",
        timeout=10,
        json={
            "command": f"seq 20000; echo first >&2; while [ ! -e {gate} ]; do sleep 0.02; done; "
            "seq 5; echo second >&2",
            "use_cache": False,
            "background": True,
        },
    ).json()
    follower = spawn_cli(
        "jobs", "logs", "--follow", "--stream", "stderr", job["job_id"], server=live_server
    )
    assert follower.stderr is not None
    assert _read_line(follower.stderr) == b"first\n"
    gate.touch()
    assert follower.wait(30) == 0
    out, err = follower.communicate(timeout=10)
    assert (out, err) == (b"", b"second\n")


def _group_gone(pgid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_entries_lists_and_invalidate_deletes_with_the_admin_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    token, admin = "t" * 32, "a" * 32
    server = live_server_factory(env={"RUNCACHE_TOKEN": token, "RUNCACHE_ADMIN_TOKEN": admin})
    env = {"RUNCACHE_URL": server.url, "RUNCACHE_TOKEN": token}
    marker = uuid.uuid4().hex
    for command in (f"echo one {marker}", f"echo two {marker}", "printf other"):
        assert runcache("run", "--", "sh", "-c", command, env=env).returncode == 0
    listed = runcache("entries", "--prefix", "sh -c 'echo", env=env)
    lines = listed.stdout.decode().splitlines()
    assert listed.returncode == 0 and lines[0].split() == [
        "KEY",
        "BYTES",
        "HITS",
        "EXPIRES",
        "IN",
        "SCOPE",
        "COMMAND",
    ]
    assert [line.endswith(f"two {marker}'") for line in lines[1:]] == [True, False]  # newest first
    as_json = orjson.loads(runcache("entries", "--json", env=env).stdout)
    assert len(as_json["entries"]) == 3
    # The keys shown are whole: each one finds its entry through the API.
    key = lines[1].split()[0]
    assert key in {entry["cache_key"] for entry in as_json["entries"]}
    found = requests.get(
        f"{server.url}/api/cache/entries/{key}",
        timeout=10,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert found.status_code == 200, found.text
    assert all(line[len(key) : len(key) + 2] == "  " for line in lines)  # the columns line up
    refused = runcache("invalidate", "--glob", f"*{marker}*", env=env)
    assert refused.returncode == 2 and b"needs the admin token" in refused.stderr
    done = runcache(
        "invalidate", "--glob", f"*{marker}*", env={**env, "RUNCACHE_ADMIN_TOKEN": admin}
    )
    assert (done.returncode, done.stdout) == (0, b"deleted 2 entries\n")
    left = orjson.loads(runcache("entries", "--json", env=env).stdout)["entries"]
    assert [entry["command"] for entry in left] == ["sh -c 'printf other'"]
    both = runcache("invalidate", "--prefix", "a", "--glob", "b", env=env)
    assert both.returncode == 2 and b'give one of "prefix" and "glob", a "scope"' in both.stderr


def test_run_entries_and_invalidate_take_a_scope_through_a_server(live_server: LiveServer) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    command = f"date +%N # {uuid.uuid4().hex}"
    plain = runcache("run", command, env=env)
    scoped = runcache("run", "--scope", "team-a", command, env=env)
    again = runcache("run", "--scope", "team-a", command, env=env)
    assert plain.returncode == scoped.returncode == again.returncode == 0
    assert scoped.stdout != plain.stdout and again.stdout == scoped.stdout
    listed = runcache("entries", "--scope", "team-a", env=env).stdout.decode().splitlines()
    assert len(listed) == 2 and listed[1].split()[4:6] == ["team-a", "date"]
    everything = orjson.loads(runcache("entries", "--json", env=env).stdout)["entries"]
    assert sorted(str(entry["scope"]) for entry in everything) == ["None", "team-a"]
    key = listed[1].split()[0]
    shown = runcache("entries", "show", key, env=env).stdout.decode().splitlines()
    assert "scope:      team-a" in shown
    done = runcache("invalidate", "--scope", "team-a", "--prefix", "date", env=env)
    assert (done.returncode, done.stdout) == (0, b"deleted 1 entry\n")
    assert runcache("entries", "--scope", "team-a", "--json", env=env).stdout.count(b"date") == 0
    assert runcache("run", command, env=env).stdout == plain.stdout  # the unscoped one stays
    bad = runcache("run", "--scope", "team a", "touch", "never", env=env)
    assert bad.returncode == 2 and b"scope must be 1 to 64 letters" in bad.stderr


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_dash_h_is_help_for_runcache_and_every_command() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["-h"])
    assert top.exit_code == 0 and "Commands:" in top.output, top.output
    for path in _commands(cli):
        shown = runner.invoke(cli, [*path, "-h"])
        assert shown.exit_code == 0, (path, shown.output)
        assert shown.output.startswith("Usage: ") and " ".join(path) in shown.output.splitlines()[0]


def test_dash_h_after_the_command_of_run_is_the_command_s() -> None:
    done = runcache("run", "--", "echo", "-h")
    assert (done.returncode, done.stdout) == (0, b"-h\n")


#: The placeholders help may show: what a value is, never the Python type behind it.
PLACEHOLDERS = {
    *("N", "DURATION", "TEXT", "URL", "DIR", "NAME", "NAME=VALUE", "PATTERN", "KEY", "JOB"),
    "CODES",
    "BOOL",
}


@pytest.mark.parametrize("path", [(), *_commands(cli)], ids=" ".join)
def test_help_speaks_one_placeholder_style_and_names_empty_defaults(
    path: tuple[str, ...],
) -> None:
    shown = CliRunner().invoke(cli, [*path, "-h"], terminal_width=200).output
    placeholders = set(
        re.findall(r"^\s+(?:-\w, )?--[a-z-]+ ([A-Z=]+)\s", shown, flags=re.MULTILINE)
    )
    assert placeholders <= PLACEHOLDERS, placeholders
    assert not re.search(r"\b(FLOAT|INTEGER|STR|BOOLEAN|RANGE)\b", shown), shown
    assert "default ]" not in shown
    if path == ("serve",):
        assert "default none]" in shown and placeholders == {"N", "DURATION", "TEXT", "BOOL"}


def test_serve_help_groups_the_settings_by_the_table_s_sections() -> None:
    shown = CliRunner().invoke(cli, ["serve", "-h"], terminal_width=200).output
    titles = re.findall(r"^(\S[^:]*):$", shown, flags=re.MULTILINE)
    assert titles == [title for title in GROUPS] + ["Other options"]
    section = {}
    for line in shown.splitlines():
        if line in {f"{title}:" for title in titles}:
            current = line[:-1]
        elif match := re.match(r"^\s+(?:-\w, )?(--[a-z-]+)", line):
            section[match[1]] = current
    for setting in settings():
        if not setting.secret:
            assert section[setting.flag] == setting.group, setting.flag
    assert section["--help"] == "Other options"


def test_every_setting_is_in_one_group() -> None:
    named = [name for names in GROUPS.values() for name in names]
    assert sorted(named) == sorted(setting.name for setting in settings())


def test_entries_show_and_delete_take_a_unique_prefix_of_the_key(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    token, admin = "t" * 32, "a" * 32
    server = live_server_factory(env={"RUNCACHE_TOKEN": token, "RUNCACHE_ADMIN_TOKEN": admin})
    env = {"RUNCACHE_URL": server.url, "RUNCACHE_TOKEN": token}
    marker = uuid.uuid4().hex
    command = ("sh", "-c", f"echo out {marker}; echo err {marker} >&2")
    assert runcache("run", "--", *command, env=env).returncode == 0
    [entry] = orjson.loads(runcache("entries", "--json", env=env).stdout)["entries"]
    key = entry["cache_key"]
    shown = runcache("entries", "show", key[:6], env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()
    assert lines[0] == f"key:        {key}" and lines[2] == "exit code:  0"
    assert lines[1] == f"command:    {shlex.join(command)}"
    assert lines[-4:] == ["--- stdout ---", f"out {marker}", "--- stderr ---", f"err {marker}"]
    as_json = orjson.loads(runcache("entries", "show", "--json", key[:10], env=env).stdout)
    assert (as_json["cache_key"], as_json["result"]["stdout"]) == (key, f"out {marker}\n")
    short = runcache("entries", "show", key[:5], env=env)
    assert (short.returncode, short.stdout) == (2, b"")
    assert short.stderr.decode() == (
        f"runcache: '{key[:5]}' is too short to name a cache entry: give at least 6 characters\n"
    )
    refused = runcache("entries", "delete", key[:8], env=env)
    assert refused.returncode == 2 and b"needs the admin token" in refused.stderr
    deleted = runcache("entries", "delete", key[:8], env={**env, "RUNCACHE_ADMIN_TOKEN": admin})
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted {key}\n".encode())
    gone = runcache("entries", "show", key[:8], env=env)
    assert gone.returncode == 2
    assert gone.stderr.decode().startswith(f"runcache: no cache entry {key[:8]}: never stored")


def test_an_ambiguous_key_prefix_names_the_candidates(tmp_path: Path) -> None:
    """Keys that share their first characters, put in a SQLite store beside a real one."""
    env = {"RUNCACHE_STORE": f"sqlite:///{tmp_path / 'cache.db'}"}
    assert runcache("run", "--", "echo", "shared", env=env).returncode == 0
    store = open_store(env["RUNCACHE_STORE"], 100, 1 << 20)
    try:
        [info] = store.entries("", 0, 10)
        found = store.entry(info.key)
        assert found is not None
        twins = ["abcdef" + "0" * 58, "abcdef" + "1" * 58]
        for twin in twins:
            assert store.put(twin, found[1], 600, store.epoch(), "echo twin")
    finally:
        store.close()
    both = runcache("entries", "show", "abcdef", env=env)
    assert (both.returncode, both.stdout) == (2, b"")
    assert both.stderr.decode() == (
        f"runcache: 'abcdef' starts 2 cache entry ids: {twins[0]}, {twins[1]}; "
        "give more characters\n"
    )
    one = runcache("entries", "show", "abcdef1", env=env)
    assert one.returncode == 0 and one.stdout.startswith(f"key:        {twins[1]}\n".encode())


def test_jobs_logs_and_cancel_take_a_unique_prefix_of_the_id(live_server: LiveServer) -> None:
    env = {"RUNCACHE_URL": live_server.url}
    marker = uuid.uuid4().hex
    job = requests.post(
        f"{live_server.url}/api/command",
        timeout=10,
        json={"command": f"echo {marker}; sleep 60", "use_cache": False, "background": True},
    ).json()
    job_id = job["job_id"]
    until(
        lambda: requests.get(f"{live_server.url}/api/jobs/{job_id}", timeout=5).json()[
            "stdout_bytes"
        ]
    )
    logs = runcache("jobs", "logs", job_id[:6], env=env)
    assert (logs.returncode, logs.stdout) == (0, f"{marker}\n".encode())
    cancelled = runcache("jobs", "cancel", job_id[:7], env=env)
    assert cancelled.stdout == f"job {job_id} cancelled\n".encode()
    short = runcache("jobs", "logs", job_id[:3], env=env)
    assert short.returncode == 2 and b"give at least 6 characters" in short.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ("--default-ttl", "7200", "--max-ttl", "60"),
            {},
            "--default-ttl must not exceed --max-ttl: 7200 > 60",
        ),
        (
            ("--max-ttl", "60"),
            {"RUNCACHE_DEFAULT_TTL": "7200"},
            "RUNCACHE_DEFAULT_TTL must not exceed --max-ttl: 7200 > 60",
        ),
        (("--max-entries", "0"), {}, "--max-entries must be at least 1"),
        ((), {"RUNCACHE_MAX_ENTRIES": "0"}, "RUNCACHE_MAX_ENTRIES must be at least 1"),
        (("--log-format", "xml"), {}, "--log-format must be text or json, got 'xml'"),
        (("--max-memory", "lots"), {}, "--max-memory must be a size such as 512M"),
        (("--env-allow", "A B"), {}, "--env-allow: 'A B' is not an environment variable name"),
        (
            (),
            {"RUNCACHE_ADMIN_TOKEN": "a" * 32},
            "RUNCACHE_ADMIN_TOKEN is set but RUNCACHE_TOKEN is not",
        ),
    ],
)
def test_a_refused_setting_is_named_as_it_was_set(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    done = runcache("serve", "--port", "0", *args, env=env)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode().startswith(f"runcache: {expected}")
    assert done.stderr.count(b"\n") == 1
