"""Nothing outlives its run: real commands that try to escape, however the run ends.

Each escape starts a ``sleep`` with an argument no other process has (a pid the
command prints is its namespace's, not the machine's), the test finds that
process by it, ends the run (the command exits, times out, is cancelled, or its
runner shuts down) and asserts by pid that it is gone, each wait with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from runcache.config import Config
from runcache.engine.engine import SHELL, Engine
from runcache.errors import ConfigError
from runcache.run import containment
from runcache.run.runner import RunControl, Runner, RunResult

from conftest import LiveServer, alive, held, marked, marker, until


@pytest.fixture(autouse=True)
def _pid_namespaces() -> None:
    """These tests fail, never skip, where runcache cannot make PID namespaces both ways:
    CI runs them as root (its test command installs packages), and a skip would hide a
    containment that stopped working."""
    assert containment.namespace_way() == containment.BY_THREAD, (
        "PID namespaces by the spawning thread need CAP_SYS_ADMIN: run the tests as root"
    )


@pytest.fixture(params=[containment.BY_THREAD, containment.BY_USER_NAMESPACE])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A runner test runs both ways a namespace is made: by the spawning thread (root's)
    and by unshare in a user namespace (any user's; root may take it too)."""
    way: str = request.param
    monkeypatch.setattr(containment, "_probed", (way, ""))
    return way


#: Runs a program as user nobody, as an ordinary user would.
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
#: The users a server runs as in the server tests: root, and nobody.
USERS = ["root", "nobody"]


def _nobody_runs(python: str) -> bool:
    """Whether user nobody may start ``python`` and it is this Python's version (the venv's
    compiled packages must load in it)."""
    wanted = f"{sys.version_info[:2]}"
    done = subprocess.run(
        [
            *AS_NOBODY,
            "/bin/sh",
            "-c",
            'exec "$0" -c "import sys; print(sys.version_info[:2])"',
            python,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    return done.stdout.strip() == wanted


def as_user(user: str) -> tuple[list[str], dict[str, str]]:
    """The interpreter that runs a server as ``user``, and what to add to its environment.

    As nobody: this Python, or where nobody may not enter the directory it lies in (a
    pyenv under /root), the system's of the same version, given this one's packages."""
    if user == "root":
        return [sys.executable], {}
    if _nobody_runs(sys.executable):
        return [*AS_NOBODY, sys.executable], {}
    system = "/usr/bin/python3"
    assert _nobody_runs(system), f"user nobody can run neither {sys.executable} nor {system}"
    source = str(Path(containment.__file__).parents[2])  # src/, above runcache/run/
    packages = [path for path in sys.path if path.endswith("site-packages")]
    return [*AS_NOBODY, system], {"PYTHONPATH": os.pathsep.join([source, *packages])}


def kernel_allows_unprivileged_namespaces() -> bool:
    """The kernel's own answer, without runcache: may user nobody make a user namespace and
    a PID namespace it owns?"""
    assert shutil.which("setpriv") and shutil.which("unshare"), "util-linux is missing"
    done = subprocess.run(
        [*AS_NOBODY, "unshare", "--user", "--pid", "--fork", "true"],
        capture_output=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    return done.returncode == 0


#: Commands that leave their run's process group, each holding ``{mark}``.
ESCAPES = {
    "setsid": "setsid sleep {mark} &",
    "setsid in a subshell": "(setsid sh -c 'sleep {mark}; :' &)",
    "cleared environment": "env -i setsid sleep {mark} &",
    "job control": "bash -c 'set -m; sleep {mark} & wait' &",
    "python setpgid": 'python3 -c \'import os; os.setpgid(0, 0); os.execvp("sleep",'
    ' ["sleep", "{mark}"])\' &',
    "perl setpgrp": 'perl -e \'setpgrp(0, 0); exec "sleep", "{mark}"\' &',
    "ignores SIGTERM and SIGHUP": "setsid sh -c 'trap \"\" TERM HUP INT; sleep {mark}; :' &",
}

ENDS = ["exit", "timeout", "cancel", "shutdown"]


def all_gone(processes: list[psutil.Process], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(process) for process in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def escaped_sleep(mark: str) -> list[psutil.Process]:
    """The escaped ``sleep`` itself (not a shell whose command line names it)."""
    return [process for process in marked(mark) if process.info["cmdline"][:1] == ["sleep"]]


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("escape", ESCAPES.values(), ids=ESCAPES.keys())
def test_an_escaped_process_dies_with_its_run(
    escape: str, end: str, tmp_path: Path, way: str
) -> None:
    mark, go = marker(), tmp_path / "go"
    command = f"{escape.format(mark=mark)}\nwhile [ ! -e {go} ]; do sleep 0.01; done"
    runner = Runner(1024, containment_mode="pidns")
    control = RunControl(1024)
    results: list[RunResult] = []
    # Long enough for the escape to start on a loaded machine (python3, perl) and be seen.
    timeout = 5 if end == "timeout" else 60
    thread = threading.Thread(
        target=lambda: results.append(runner.run([*SHELL, command], timeout, control))
    )
    thread.start()
    try:
        # The escape can be seen before the runner has learnt the run's pid (a loaded
        # machine): a cancel needs that pid, so wait for both.
        until(
            lambda: escaped_sleep(mark) and control.pid is not None,
            what="for the escaped process and the run's pid",
        )
        escaped = marked(mark)
        if end == "exit":
            go.touch()
        elif end == "cancel":
            assert control.cancel()
        elif end == "shutdown":
            runner.kill_all()
        thread.join(30)
        assert not thread.is_alive()
        assert all_gone(escaped), f"left running: {[p.pid for p in escaped if alive(p)]}"
        [result] = results
        assert result.success == (end == "exit")
        assert result.timed_out == (end == "timeout")
        assert result.cancelled == (end == "cancel")
    finally:
        go.touch()
        runner.kill_all()
        thread.join(30)


def test_the_issues_job_control_case_times_out_and_leaves_nothing(way: str) -> None:
    mark = marker()
    runner = Runner(1024, containment_mode="pidns")
    started = time.monotonic()
    result = runner.run([*SHELL, f"bash -c 'set -m; sleep {mark} & wait'"], timeout=2)
    assert result.timed_out and time.monotonic() - started < 10
    assert runner.running == 0
    until(lambda: not marked(mark), 5, "for the sleep to die")
    runner.kill_all()


def test_pause_stops_processes_that_left_the_group_and_resume_continues_them(
    tmp_path: Path, way: str
) -> None:
    mark, go = marker(), tmp_path / "go"
    command = f"setsid sleep {mark} & sleep {marker()} & while [ ! -e {go} ]; do sleep 0.01; done"
    runner = Runner(1024, containment_mode="pidns")
    control = RunControl(1024)
    thread = threading.Thread(target=lambda: runner.run([*SHELL, command], 60, control))
    thread.start()
    try:
        until(lambda: escaped_sleep(mark), what="for the escaped process")
        [escaped] = escaped_sleep(mark)
        assert control.pause()
        leader = psutil.Process(control.pid)
        until(lambda: escaped.status() == psutil.STATUS_STOPPED, 5, "for the stop")
        until(lambda: held(leader), 5, "for the leader's stop")
        assert control.resume()
        until(lambda: escaped.status() != psutil.STATUS_STOPPED, 5, "for the resume")
        assert control.cancel()
        thread.join(30)
        assert all_gone([escaped])
    finally:
        go.touch()
        runner.kill_all()
        thread.join(30)


def test_a_command_is_pid_1_of_its_own_namespace(way: str) -> None:
    runner = Runner(1024, containment_mode="pidns")
    try:
        result = runner.run([*SHELL, "echo $$; readlink /proc/self/ns/pid"], 10)
        pid, namespace = result.stdout.decode().splitlines()
        assert pid == "1" and namespace != os.readlink("/proc/self/ns/pid")
    finally:
        runner.kill_all()


def test_group_mode_keeps_no_namespace() -> None:
    runner = Runner(1024, containment_mode="group")
    result = runner.run([*SHELL, "echo $$"], 10)
    assert result.stdout.strip() != b"1"
    runner.kill_all()


def test_the_watchdog_kills_a_run_whose_runner_is_gone_and_ends(way: str) -> None:
    mark = marker()
    runner = Runner(1024, containment_mode="pidns")
    thread = threading.Thread(
        target=lambda: runner.run([*SHELL, f"setsid sleep {mark} & sleep {mark}"], 60)
    )
    thread.start()
    until(lambda: escaped_sleep(mark), what="for the run")
    watchdog = psutil.Process(until(lambda: runner._watchdog.pid, what="the watchdog"))
    # Started outside the run's namespace, or it would die with the run it watches.
    assert os.readlink(f"/proc/{watchdog.pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    escaped = marked(mark)
    runner._watchdog.close()  # as when the server dies: the watchdog's pipe ends
    assert all_gone([watchdog, *escaped])
    thread.join(30)
    runner.kill_all()


def _post_in_background(server: LiveServer, command: str) -> threading.Thread:
    def post() -> None:
        try:
            requests.post(
                f"{server.url}/api/command",
                json={"command": command, "use_cache": False},
                timeout=60,
            )
        except requests.RequestException:
            pass  # the server was killed under the request

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _start_as(
    factory: Callable[..., LiveServer], user: str, env: dict[str, str] | None = None
) -> LiveServer:
    python, environment = as_user(user)
    server = factory(python=python, env={**environment, **(env or {})})
    if user == "nobody" and kernel_allows_unprivileged_namespaces():
        # Said once, at start: how runs are contained.
        assert any(
            "PID namespaces of their own, in user namespaces" in line for line in server.output
        ), server.output
    return server


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_server_that_dies_takes_its_runs_with_it(
    live_server_factory: Callable[..., LiveServer], signum: int, user: str
) -> None:
    """As root and as an ordinary user: where the kernel allows unprivileged namespaces
    (Debian 12 does), nobody's runs are contained in them, escapes included."""
    server = _start_as(live_server_factory, user)
    mark, other, third = marker(), marker(), marker()
    posts = [
        _post_in_background(server, f"setsid sleep {mark} & sleep {mark}"),
        _post_in_background(
            server, f'perl -e \'setpgrp(0, 0); exec "sleep", "{other}"\' & sleep {other}'
        ),
        _post_in_background(
            server, f"(setsid sh -c 'sleep {third}; :' &); bash -c 'set -m; sleep {third} & wait'"
        ),
    ]
    until(
        lambda: (
            len(marked(mark)) >= 3 and len(marked(other)) >= 2 and len(escaped_sleep(third)) >= 2
        ),
        what="for the runs",
    )
    runs = marked(mark) + marked(other) + marked(third)
    server.process.send_signal(signum)
    server.process.wait(15)
    assert all_gone(runs), f"left running: {[p.pid for p in runs if alive(p)]}"
    for post in posts:
        post.join(30)


def _watchdog_of(server: LiveServer) -> psutil.Process:
    """The server's watchdog (started at its first run)."""
    answer = requests.post(
        f"{server.url}/api/command", timeout=60, json={"command": "true", "use_cache": False}
    )
    assert answer.status_code == 200, answer.text

    def find() -> psutil.Process | None:
        for child in psutil.Process(server.process.pid).children():
            if "runcache.run.containment" in " ".join(child.cmdline()):
                return child
        return None

    return until(find, what="for the watchdog")


@pytest.mark.parametrize("user", USERS)
def test_a_run_cannot_disable_the_watchdog(
    live_server_factory: Callable[..., LiveServer], user: str, tmp_path: Path
) -> None:
    """The issue's attack: garbage and forged ``-PID`` lines written into the watchdog's
    stdin through /proc, signals to kill or stop it; then the server is SIGKILLed, and
    nothing of the run survives."""
    server = _start_as(live_server_factory, user)
    watchdog = _watchdog_of(server)
    mark = marker()
    forged = "".join(f"-{pid}\\n" for pid in range(1, 4)) + "garbage\\n+x\\n"
    attack = (
        f"printf %b '{forged}' > /proc/{watchdog.pid}/fd/0; "
        f"cat /proc/{server.process.pid}/environ; "
        f"for s in KILL STOP TERM; do kill -s $s {watchdog.pid}; done; "
        f"setsid sleep {mark} & sleep {mark}"
    )
    post = _post_in_background(server, attack)
    until(lambda: len(marked(mark)) >= 2, what="for the run")
    runs = marked(mark)
    assert alive(watchdog) and watchdog.status() != psutil.STATUS_STOPPED
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(15)
    assert all_gone(runs), f"left running: {[p.pid for p in runs if alive(p)]}"
    assert all_gone([watchdog])
    post.join(30)


def test_the_watchdogs_stdin_cannot_be_opened_and_garbage_does_not_stop_it(way: str) -> None:
    mark = marker()
    runner = Runner(1024, containment_mode="pidns")
    thread = threading.Thread(target=lambda: runner.run([*SHELL, f"sleep {mark}"], 60))
    thread.start()
    try:
        until(lambda: marked(mark), what="for the run")
        # The run is visible a moment before the runner tells the watchdog of it (and
        # starts it): psutil.Process(None) would be this very process.
        watchdog = psutil.Process(until(lambda: runner._watchdog.pid, what="the watchdog"))
        with pytest.raises(OSError):  # a socket: not even root opens it through /proc
            open(f"/proc/{watchdog.pid}/fd/0", "wb").close()
        runner._watchdog._send("garbage\n+\n-\n+-1\n+99999999999999\n" + "x" * 100_000 + "\n-abc\n")
        runner._watchdog._send(f"-{os.getpid()}\n")
        escaped = marked(mark)
        runner._watchdog.close()  # as when the server dies
        assert all_gone([watchdog, *escaped])
    finally:
        runner.kill_all()
        thread.join(30)


@pytest.mark.parametrize("user", USERS)
def test_a_run_sees_only_its_own_processes(
    live_server_factory: Callable[..., LiveServer], user: str
) -> None:
    """A /proc of its own: the server's processes (and the secrets in their environment)
    are out of sight, and ps works."""
    secret = "s3cret-" + marker()
    server = _start_as(live_server_factory, user, {"RUNCACHE_REDIS_PASSWORD": secret})
    command = (
        f"ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; "
        f"cat /proc/{server.process.pid}/environ; echo; ps -eo pid=,comm= | wc -l"
    )
    answer = requests.post(
        f"{server.url}/api/command", timeout=60, json={"command": command, "use_cache": False}
    ).json()
    pids, environ, processes = answer["stdout"].splitlines()
    assert secret not in answer["stdout"] + answer["stderr"]
    assert environ == "" and "No such file" in answer["stderr"]
    # The shell (PID 1), and ls, grep, tr: a handful, none of the machine's.
    assert 1 <= len(pids.split()) <= 5 and "1" in pids.split(), pids
    assert int(processes) <= 4, answer


def test_without_namespaces_auto_falls_back_to_the_group_and_pidns_refuses(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cause = "the kernel forbids unprivileged user namespaces (kernel.unprivileged_userns_clone=0)"
    monkeypatch.setattr(containment, "_probed", (None, cause))  # as such a kernel answers
    assert containment.resolve("auto") == "group"
    assert "outlives its run" in caplog.text and cause in caplog.text
    with pytest.raises(ConfigError, match="^containment pidns needs CAP_SYS_ADMIN"):
        Engine.from_config(Config.load({"containment": "pidns"}, environ={}))


def test_an_unprivileged_user_gets_pid_namespaces_where_the_kernel_allows() -> None:
    """Asked as user nobody (util-linux's setpriv): pidns where the kernel lets nobody make
    user and PID namespaces (Debian 12, CI), else group and the cause."""
    python, environment = as_user("nobody")
    source = str(Path(containment.__file__).parents[2])  # src/, above runcache/run/
    answer = subprocess.run(
        [
            *python,
            "-c",
            "from runcache.run import containment; "
            "print(containment.resolve('auto'), containment.namespace_way())",
        ],
        env={"PYTHONPATH": source, **environment, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    if kernel_allows_unprivileged_namespaces():
        assert answer.stdout == "pidns userns\n", answer.stderr
    else:
        assert answer.stdout == "group None\n" and "outlives its run" in answer.stderr


@pytest.mark.parametrize("user", USERS)
def test_through_a_server_a_timed_out_job_control_run_leaves_nothing(
    live_server_factory: Callable[..., LiveServer], user: str
) -> None:
    """The issue's case end to end: the answer says timed out, /health says nothing runs,
    and by pid nothing does."""
    live_server = _start_as(live_server_factory, user)
    mark = marker()
    answer = requests.post(
        f"{live_server.url}/api/command",
        timeout=60,
        json={
            "command": f"bash -c 'set -m; sleep {mark} & wait'",
            "timeout": 2,
            "use_cache": False,
        },
    )
    assert answer.json()["timed_out"] is True
    health = requests.get(f"{live_server.url}/health", timeout=10).json()
    assert health["running_commands"] == 0
    until(lambda: not marked(mark), 5, "for the sleep to die")
