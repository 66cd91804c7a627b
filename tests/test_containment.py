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

from runcache import containment
from runcache.config import Config
from runcache.errors import ConfigError
from runcache.runner import RunControl, Runner, RunResult
from runcache.service import SHELL, Engine

from conftest import LiveServer, alive, marked, marker, until


@pytest.fixture(autouse=True)
def _pid_namespaces() -> None:
    """These tests fail, never skip, where runcache cannot make PID namespaces: CI runs
    them as root (its test command installs packages), and a skip would hide a
    containment that stopped working."""
    assert containment.pid_namespaces_available(), (
        "PID namespaces need CAP_SYS_ADMIN: run the tests as root")

#: Commands that leave their run's process group, each holding ``{mark}``.
ESCAPES = {
    "setsid": "setsid sleep {mark} &",
    "setsid in a subshell": "(setsid sh -c 'sleep {mark}; :' &)",
    "cleared environment": "env -i setsid sleep {mark} &",
    "job control": "bash -c 'set -m; sleep {mark} & wait' &",
    "python setpgid": "python3 -c 'import os; os.setpgid(0, 0); os.execvp(\"sleep\","
                      " [\"sleep\", \"{mark}\"])' &",
    "perl setpgrp": "perl -e 'setpgrp(0, 0); exec \"sleep\", \"{mark}\"' &",
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
def test_an_escaped_process_dies_with_its_run(escape: str, end: str, tmp_path: Path) -> None:
    mark, go = marker(), tmp_path / "go"
    command = f"{escape.format(mark=mark)}\nwhile [ ! -e {go} ]; do sleep 0.01; done"
    runner = Runner(1024, containment_mode="pidns")
    control = RunControl(1024)
    results: list[RunResult] = []
    # Long enough for the escape to start on a loaded machine (python3, perl) and be seen.
    timeout = 5 if end == "timeout" else 60
    thread = threading.Thread(
        target=lambda: results.append(runner.run([*SHELL, command], timeout, control)))
    thread.start()
    try:
        until(lambda: escaped_sleep(mark), what="for the escaped process")
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


def test_the_issues_job_control_case_times_out_and_leaves_nothing() -> None:
    mark = marker()
    runner = Runner(1024, containment_mode="pidns")
    started = time.monotonic()
    result = runner.run([*SHELL, f"bash -c 'set -m; sleep {mark} & wait'"], timeout=2)
    assert result.timed_out and time.monotonic() - started < 10
    assert runner.running == 0
    until(lambda: not marked(mark), 5, "for the sleep to die")
    runner.kill_all()


def test_pause_stops_processes_that_left_the_group_and_resume_continues_them(
    tmp_path: Path,
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
        # Each stops once it leaves the kernel (a shell waiting for a vfork shows D first).
        until(lambda: escaped.status() == psutil.STATUS_STOPPED, 5, "for the stop")
        until(lambda: leader.status() == psutil.STATUS_STOPPED, 5, "for the leader's stop")
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


def test_the_watchdog_kills_a_run_whose_runner_is_gone_and_ends() -> None:
    mark = marker()
    runner = Runner(1024, containment_mode="pidns")
    thread = threading.Thread(
        target=lambda: runner.run([*SHELL, f"setsid sleep {mark} & sleep {mark}"], 60))
    thread.start()
    until(lambda: escaped_sleep(mark), what="for the run")
    watchdog = psutil.Process(runner._watchdog.pid)
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
            requests.post(f"{server.url}/api/command", json={"command": command,
                          "use_cache": False}, timeout=60)
        except requests.RequestException:
            pass  # the server was killed under the request

    thread = threading.Thread(target=post)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_server_that_dies_takes_its_runs_with_it(
    live_server_factory: Callable[..., LiveServer], signum: int
) -> None:
    server = live_server_factory()
    mark, other = marker(), marker()
    posts = [_post_in_background(server, f"setsid sleep {mark} & sleep {mark}"),
             _post_in_background(server, f"perl -e 'setpgrp(0, 0); exec \"sleep\", \"{other}\"'"
                                 f" & sleep {other}")]
    until(lambda: len(marked(mark)) >= 3 and len(marked(other)) >= 2, what="for both runs")
    runs = marked(mark) + marked(other)
    server.process.send_signal(signum)
    server.process.wait(15)
    assert all_gone(runs), f"left running: {[p.pid for p in runs if alive(p)]}"
    for post in posts:
        post.join(30)


def test_without_cap_sys_admin_auto_falls_back_to_the_group_and_pidns_refuses(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(containment, "_probed", False)  # as the kernel answers a non-root user
    assert containment.resolve("auto") == "group"
    assert "outlives its run" in caplog.text
    with pytest.raises(ConfigError, match="^containment pidns needs CAP_SYS_ADMIN"):
        Engine.from_config(Config.load({"containment": "pidns"}, environ={}))


def test_an_unprivileged_user_cannot_make_a_pid_namespace() -> None:
    """The probe the fallback rests on, asked of the kernel as user nobody (util-linux's
    setpriv, in every Debian and Ubuntu)."""
    assert shutil.which("setpriv"), "util-linux's setpriv is missing"
    source = str(Path(containment.__file__).parent.parent)
    answer = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", "from runcache import containment; "
         "print(containment.resolve('auto'))"],
        env={"PYTHONPATH": source, "PATH": os.environ["PATH"]}, capture_output=True,
        text=True, timeout=60, cwd="/",
    )
    assert answer.stdout == "group\n", answer.stderr


def test_through_a_server_a_timed_out_job_control_run_leaves_nothing(
    live_server: LiveServer,
) -> None:
    """The issue's case end to end: the answer says timed out, /health says nothing runs,
    and by pid nothing does."""
    mark = marker()
    answer = requests.post(f"{live_server.url}/api/command", timeout=60, json={
        "command": f"bash -c 'set -m; sleep {mark} & wait'", "timeout": 2, "use_cache": False})
    assert answer.json()["timed_out"] is True
    health = requests.get(f"{live_server.url}/health", timeout=10).json()
    assert health["running_commands"] == 0
    until(lambda: not marked(mark), 5, "for the sleep to die")
