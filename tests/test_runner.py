"""Running commands for real: exit codes, streams, timeouts that kill the group, output caps."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runcache.engine.engine import SHELL
from runcache.run.runner import Runner

from conftest import marked, marker


def sh(command: str) -> list[str]:
    return [*SHELL, command]


@pytest.fixture(params=["pidns", "group"])
def containment(request: pytest.FixtureRequest) -> str:
    """Each test of what a runner promises in either mode runs in both."""
    mode: str = request.param
    return mode


def test_streams_and_exit_code_are_kept_apart() -> None:
    result = Runner(1024).run(sh("echo out; echo err >&2; exit 3"), timeout=10)
    kept = (bytes(result.stdout), bytes(result.stderr), result.return_code)
    assert kept == (b"out\n", b"err\n", 3)
    assert not result.success and not result.timed_out and not result.partial_results
    assert result.execution_time >= 0 and "T" in result.timestamp


def test_success_means_exit_zero() -> None:
    result = Runner(1024).run(sh("true"), timeout=10)
    assert result.success and result.return_code == 0


def test_timeout_kills_the_whole_process_group(containment: str) -> None:
    one, two = marker(), marker()
    command = (
        f"sleep {one} & (sleep {two}; echo never) & "
        f"until pgrep -f '^sleep {two}' >/dev/null; do sleep 0.01; done; "
        "echo started; sleep 60"
    )
    result = Runner(1024, containment_mode=containment).run(sh(command), timeout=2)
    assert result.timed_out and not result.success
    assert result.stdout == b"started\n" and result.partial_results
    assert result.return_code < 0
    assert _gone(one) and _gone(two), "a process of the timed-out group survived"


def test_processes_left_behind_by_a_finished_command_are_killed(containment: str) -> None:
    mark = marker()
    command = (
        f"sleep {mark} > /dev/null 2>&1 & "
        f"until pgrep -f '^sleep {mark}' >/dev/null; do sleep 0.01; done"
    )
    result = Runner(1024, containment_mode=containment).run(sh(command), 10)
    assert result.success
    assert _gone(mark)


def _gone(mark: str) -> bool:
    """Whether no process holds ``mark`` once a SIGKILL has had time to land."""
    deadline = time.monotonic() + 5
    while marked(mark):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_background_child_holding_the_pipe_does_not_hang_the_run(containment: str) -> None:
    started = time.monotonic()
    result = Runner(1024, containment_mode=containment).run(sh("sleep 60 & echo done"), 30)
    assert result.success and result.stdout == b"done\n"
    assert time.monotonic() - started < 20  # bounded by the exit grace, far below the timeout


def test_output_beyond_the_cap_is_cut_and_flagged() -> None:
    result = Runner(1000).run(sh("head -c 5000 /dev/zero | tr '\\0' a; echo e >&2"), 10)
    assert result.stdout == b"a" * 1000 and result.stdout_truncated
    assert result.stderr == b"e\n" and not result.stderr_truncated
    assert result.success


def test_large_output_is_drained_so_the_command_finishes() -> None:
    # 4 MiB through a 64 KiB cap: the command must not block on a full pipe.
    result = Runner(65536).run(sh("head -c 4194304 /dev/zero"), timeout=30)
    assert result.success and not result.timed_out
    assert len(result.stdout) == 65536 and result.stdout_truncated


def test_missing_executable_is_a_result_not_an_exception() -> None:
    result = Runner(1024).run(["/nonexistent/tool", "x"], 10)
    assert result.return_code == 127 and b"cannot run" in result.stderr


def test_environment_and_directory_are_applied(tmp_path: Path) -> None:
    runner = Runner(1024, env={"ONLY": "this", "PATH": os.environ["PATH"]}, cwd=str(tmp_path))
    result = runner.run(sh('echo "$ONLY $HOME"; pwd'), 10)
    assert result.stdout == f"this \n{tmp_path}\n".encode()


def test_kill_all_stops_running_commands_and_refuses_new_ones(containment: str) -> None:
    import threading

    runner = Runner(1024, containment_mode=containment)
    results = []
    thread = threading.Thread(target=lambda: results.append(runner.run(sh("sleep 60"), 60)))
    thread.start()
    while runner.running == 0:
        time.sleep(0.01)
    runner.kill_all()
    thread.join(10)
    assert not thread.is_alive() and results[0].return_code < 0
    assert runner.run(sh("true"), 10).return_code == 127


def test_command_that_closes_its_output_still_runs_to_the_end(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    result = Runner(1024).run(sh(f"exec >&- 2>&-; sleep 0.3; touch {marker}"), timeout=30)
    assert result.success and not result.timed_out and marker.exists()


def test_command_that_closes_its_output_still_times_out() -> None:
    result = Runner(1024).run(sh("exec >&- 2>&-; sleep 30"), timeout=0.3)
    assert result.timed_out and not result.success and result.return_code < 0
