"""End to end: ``runcache serve`` as a real process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import psutil
import pytest
import requests

from runcache.wire import CacheStats, Cleared, CommandResult

from conftest import LiveServer, marked, marker, start_server, until

S = TypeVar("S", bound=msgspec.Struct)


def post(server: LiveServer, path: str, **body: object) -> requests.Response:
    return requests.post(server.url + path, json=body or None, timeout=30)


def typed(shape: type[S], response: requests.Response) -> S:
    """The answer decoded strictly as the wire shape the API declares for it."""
    assert response.status_code == 200, response.text
    return msgspec.json.decode(response.content, type=shape, strict=True)


def test_run_twice_hit_clear_and_stats_zero(live_server: LiveServer) -> None:
    first = typed(CommandResult, post(live_server, "/api/command", command="echo $$"))
    second = typed(CommandResult, post(live_server, "/api/command", command="echo $$"))
    assert first.cached is False and second.cached is True
    assert second.stdout == first.stdout
    cleared = requests.post(live_server.url + "/api/cache/clear", timeout=10)
    assert cleared.status_code == 200
    assert cleared.json() == {"success": True, "message": "Cache cleared"}
    assert typed(Cleared, cleared) == Cleared()
    stats = typed(CacheStats, requests.get(live_server.url + "/api/cache/stats", timeout=10))
    assert (stats.size, stats.hits, stats.misses, stats.evictions) == (0, 0, 0, 0)
    assert stats.hit_rate == "0.0%"
    # The line is read from the server's stderr by a thread of its own: wait for it.
    until(lambda: any("🧹 Cache cleared" in line for line in live_server.output))


def test_twenty_concurrent_identical_requests_run_once(
    live_server: LiveServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; sleep 0.5; echo done"
    answers: list[dict[str, object]] = []

    def ask() -> None:
        answers.append(post(live_server, "/api/command", command=command).json())

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert runs.read_text() == "run\n"
    assert len(answers) == 20 and {a["stdout"] for a in answers} == {"done\n"}


def test_bad_input_over_http_is_json_4xx(live_server: LiveServer) -> None:
    response = requests.post(live_server.url + "/api/command", data=b"{nope", timeout=10)
    assert response.status_code == 400 and "valid JSON" in response.json()["error"]
    response = requests.post(live_server.url + "/api/command", data=b"x" * (2 << 20), timeout=10)
    assert response.status_code == 413 and "error" in response.json()
    response = requests.get(live_server.url + "/missing", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_kills_running_commands_and_exits_0(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path, signum: int
) -> None:
    server = live_server_factory()
    mark = marker()
    # The shell waits on a child of its own: only killing the whole group ends both.
    command = f"sleep {mark} & wait"
    answers: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(post(server, "/api/command", command=command))
    )
    thread.start()
    sleeper = _sleeping(mark)
    server.process.send_signal(signum)
    assert server.process.wait(15) == 0
    sleeper.wait(10)  # raises if the command outlived the server
    thread.join(10)
    # The request waiting on the command was answered before the server went.
    assert [answer.status_code for answer in answers] == [200]
    assert answers[0].json()["success"] is False
    assert server.stop() == 0
    assert any("stopping" in line for line in server.output)


def test_a_stop_kills_every_running_group_not_only_the_first(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server_factory()
    # Found from here by their arguments: a run sees only its own pids, in its namespaces.
    marks = [marker() for _ in range(3)]
    for mark in marks:  # three runs at once, each a shell waiting on a child
        accepted = requests.post(
            f"{server.url}/api/command",
            timeout=10,
            json={"command": f"sleep {mark} & wait", "background": True},
        )
        assert accepted.status_code == 202
    sleepers = [_sleeping(mark) for mark in marks]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    for sleeper in sleepers:
        sleeper.wait(10)  # raises if one outlived the server


def test_commands_never_read_the_servers_stdin(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """A command gets an empty stdin, not the terminal or pipe the server was started with."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"typed at the server's terminal\n")
    try:
        server = start_server(stdin=read_end)
        try:
            result = typed(
                CommandResult, post(server, "/api/command", command="cat; echo done", timeout=10)
            )
        finally:
            server.stop()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (result.stdout, result.return_code, result.timed_out) == ("done\n", 0, False)


def test_a_hit_costs_no_info_log_line(live_server: LiveServer) -> None:
    post(live_server, "/api/command", command="echo quiet")
    until(lambda: any("ran 'echo quiet'" in line for line in live_server.output))
    lines_before = len(live_server.output)
    for _ in range(5):
        assert post(live_server, "/api/command", command="echo quiet").json()["cached"]
    # The log keeps the order of events: once a later run's line is in, a hit's would be.
    post(live_server, "/api/command", command="echo after")
    until(lambda: any("ran 'echo after'" in line for line in live_server.output))
    assert [
        line for line in live_server.output[lines_before:] if "ran 'echo after'" not in line
    ] == []


def test_start_up_errors_are_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--store", "ftp://nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "runcache: --store: unknown store 'ftp://nowhere': use one of "
        + result.stderr.split("one of ")[1].strip()
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--store", "sqlite://"], "runcache: --store: store 'sqlite://' names no file"),
        (["--allow", "echo,no-such-command-here"], "runcache: --allow: no-such-command-here"),
        (["--audit-log", "/nonexistent/audit.log"], "runcache: --audit-log: '/nonexistent/"),
    ],
)
def test_settings_checked_as_opened_are_named_by_flag(flags: list[str], message: str) -> None:
    """The store, the allowlist and the audit log are checked after the settings load;
    their refusals name the flag, as every other setting's do (not ``store``)."""
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr


def test_port_in_use_is_one_line(live_server: LiveServer) -> None:
    port = live_server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", port],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and port in result.stderr


def _ignore_errors(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)
    except requests.RequestException:
        pass


def _sleeping(mark: str) -> psutil.Process:
    """The ``sleep`` of a run, found from here by its argument: in its namespaces a run
    sees only its own pids, so it cannot say which is its pid on the machine."""
    found = until(lambda: [process for process in marked(mark) if process.name() == "sleep"])
    return found[0]


#: Prints the shell's parent as the machine numbers it: read from /proc, which a run sees
#: as the machine's only under --containment group (else its own /proc, where it is PID 1).
_PARENT = "read -r pid comm state ppid rest < /proc/self/stat; echo $ppid"


def test_serves_on_ipv6_loopback(live_server_factory: Callable[..., LiveServer]) -> None:
    server = live_server_factory("--host", "::1")
    assert server.url.startswith("http://[::1]:")
    assert requests.get(server.url + "/livez", timeout=10).json() == {"status": "ok"}


def test_two_workers_serve_one_port_share_the_cache_and_stop_together(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server_factory(
        "--workers", "2", "--store", f"sqlite://{tmp_path / 'cache.db'}", "--containment", "group"
    )
    url = server.url + "/api/command"

    def worker_of(session: requests.Session) -> int:
        # The shell's parent is the worker that runs it: the one that accepted the connection
        # (read from /proc: in the shell's own PID namespace its $PPID is 0).
        answer = session.post(url, json={"command": _PARENT, "use_cache": False}, timeout=30)
        return int(answer.json()["stdout"])

    # A kept-alive connection stays with the worker that accepted it; open
    # connections until each worker holds one.
    sessions: dict[int, requests.Session] = {}
    try:
        deadline = time.monotonic() + 20
        while len(sessions) < 2:
            assert time.monotonic() < deadline, f"only worker {list(sessions)} ever answered"
            session = requests.Session()
            pid = worker_of(session)
            if pid in sessions:
                session.close()
            else:
                sessions[pid] = session
        server_children = psutil.Process(server.process.pid).children()
        assert {child.pid for child in server_children} == set(sessions)
        first, second = sessions.values()
        command = {"command": f"{_PARENT}; date +%s%N"}
        ran = first.post(url, json=command, timeout=30).json()
        shared = second.post(url, json=command, timeout=30).json()
        assert (ran["cached"], shared["cached"]) == (False, True)
        assert shared["stdout"] == ran["stdout"]
        # Still one worker each: the hit came from the worker that did not run it.
        assert [worker_of(session) for session in sessions.values()] == list(sessions)
    finally:
        for session in sessions.values():
            session.close()
    workers = [psutil.Process(pid) for pid in sessions]
    for pid in sessions:
        assert sum(f"pid {pid})" in line for line in server.output) == 1

    mark = marker()
    sleep = {"command": f"sleep {mark} & wait", "use_cache": False}
    waiter = threading.Thread(
        target=lambda: _ignore_errors(requests.post, url, json=sleep, timeout=30)
    )
    waiter.start()
    sleeper = _sleeping(mark)
    assert server.stop() == 0
    waiter.join(10)
    _, alive = psutil.wait_procs([*workers, sleeper], timeout=10)
    assert alive == []


def test_several_workers_refuse_the_memory_store_in_one_line() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    result = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("runcache: --workers 2 needs a store the workers share: with memory://")


def test_workers_do_not_share_a_port_another_server_holds(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    store = f"sqlite://{tmp_path / 'cache.db'}"
    first = live_server_factory("--workers", "2", "--store", store)
    port = first.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcache",
            "serve",
            "--port",
            port,
            "--workers",
            "2",
            "--store",
            store,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"runcache: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_an_identical_request_runs_at_once_after_the_worker_holding_its_lock_is_killed(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """A worker killed with SIGKILL cannot release its SQLite lock: the next acquire sees
    that its owner (a process of this machine) is gone and takes it, without waiting for
    the lease (here over 120 s: the request's timeout)."""
    server = live_server_factory(
        "--workers", "2", "--store", f"sqlite://{tmp_path / 'cache.db'}", "--containment", "group"
    )
    runs, mark = tmp_path / "runs", marker()
    # The first run records its worker and sleeps; the second one ends at once.
    command = {
        "command": f"{_PARENT} >> {runs}; [ $(wc -l < {runs}) -gt 1 ] || sleep {mark}",
        "timeout": 120,
    }
    url = server.url + "/api/command"
    first = threading.Thread(
        target=lambda: _ignore_errors(requests.post, url, json=command, timeout=60)
    )
    first.start()
    try:
        until(lambda: runs.exists() and runs.read_text().strip())
        holder = int(runs.read_text())
        assert holder in {child.pid for child in psutil.Process(server.process.pid).children()}
        os.kill(holder, signal.SIGKILL)
        first.join(10)
        answer = requests.post(url, json=command, timeout=15).json()
        assert (answer["cached"], answer["return_code"]) == (False, 0)
        assert int(runs.read_text().split()[1]) != holder
    finally:
        for process in marked(mark):
            process.kill()
