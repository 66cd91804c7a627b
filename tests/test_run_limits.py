"""Per-run limits that bite: each run over one fails, says which in its stderr, is not
cached, and the server carries on."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from runcache.config import Config, parse_size
from runcache.engine.engine import SHELL
from runcache.errors import ConfigError
from runcache.run.rlimits import NO_LIMITS, RunLimits, format_size
from runcache.run.runner import Runner

from conftest import LiveServer


def run(server: LiveServer, command: str) -> dict[str, object]:
    answer = requests.post(f"{server.url}/api/command", json={"command": command}, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, object] = answer.json()
    return result


LIMIT_FLAGS = (
    "--max-memory",
    "256M",
    "--max-file-size",
    "1M",
    "--max-open-files",
    "32",
    "--max-cpu-seconds",
    "1",
    "--max-processes",
    "300",
)

OVER = {
    "memory": ("python3 -c 'b = bytearray(512 << 20)'", "--max-memory 256M"),
    "file size": ("head -c 2000000 /dev/zero > {tmp}/big", "--max-file-size 1M"),
    "open files": (
        "python3 -c 'fs = [open(\"/dev/null\") for _ in range(100)]'",
        "--max-open-files 32",
    ),
    "cpu": ("python3 -c 'while True: pass'", "--max-cpu-seconds 1"),
    "processes": ("while :; do sleep 600 & done", "--max-processes 300"),
}


def test_runs_over_each_limit_fail_uncached_and_the_server_carries_on(
    live_server_factory: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server_factory(*LIMIT_FLAGS)
    for name, (command, flag) in OVER.items():
        command = command.format(tmp=tmp_path)
        first = run(server, command)
        assert first["success"] is False and first["return_code"] != 0, name
        assert str(first["stderr"]).endswith(f"runcache: the run exceeded {flag}\n"), first
        again = run(server, command)
        assert again["cached"] is False, f"a run over {flag} was cached"
        assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "healthy"
    assert (tmp_path / "big").stat().st_size == 1 << 20
    within = run(server, "python3 -c 'b = bytearray(64 << 20); print(len(b))'")
    assert within["success"] is True and within["stdout"] == f"{64 << 20}\n"
    assert run(server, "python3 -c 'b = bytearray(64 << 20); print(len(b))'")["cached"] is True


def test_no_limit_means_no_wrapper_and_no_line() -> None:
    runner = Runner(1024, containment_mode="pidns")
    result = runner.run([*SHELL, "cat /proc/self/limits | grep -c unlimited; exit 3"], 10)
    assert result.return_code == 3 and b"runcache:" not in result.stderr
    assert runner.limits is NO_LIMITS and runner._limit_prefix == []
    runner.kill_all()


def test_limits_apply_to_every_process_of_the_run() -> None:
    runner = Runner(1024, limits=RunLimits(open_files=50, file_size=3 << 20))
    result = runner.run([*SHELL, "sh -c 'ulimit -n; ulimit -f'"], 10)
    assert result.stdout == b"50\n6144\n"  # ulimit -f counts 512-byte blocks
    runner.kill_all()


def test_a_failure_not_caused_by_a_limit_gets_no_line() -> None:
    limits = RunLimits(memory=1 << 30, open_files=64)
    assert limits.exceeded(1, b"grep: no such file\n", 0.0) is None
    assert limits.exceeded(0, b"MemoryError\n", 0.0) is None  # it coped
    assert (
        limits.exceeded(1, b"MemoryError\n", 0.0) == "runcache: the run exceeded --max-memory 1G\n"
    )
    cpu = RunLimits(cpu_seconds=2)
    assert (
        cpu.exceeded(-signal.SIGKILL, b"", 2.01) == "runcache: the run exceeded "
        "--max-cpu-seconds 2\n"
    )
    assert cpu.exceeded(1, b"", 0.5) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("", 0),
        ("0", 0),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("10k", 10 << 10),
        ("4096", 4096),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("size", "text"), [(512 << 20, "512M"), (1 << 30, "1G"), (1000, "1000"), (3 << 40, "3T")]
)
def test_sizes_are_shown_in_the_largest_whole_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("setting", ["max_memory", "max_file_size"])
@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1.5G", "512X", "99999999999999999999T"])
def test_nonsense_sizes_are_refused_in_one_line(setting: str, text: str) -> None:
    with pytest.raises(ConfigError, match=f"^{setting} must be a size such as 512M"):
        Config.load({setting: text}, environ={})


def test_a_fork_loop_ends_at_the_process_limit() -> None:
    machines = Path("/proc/sys/kernel/pid_max").read_text()
    runner = Runner(1 << 16, limits=RunLimits(processes=300))
    started = time.monotonic()
    result = runner.run([*SHELL, "python3 -c 'import os\nwhile True: os.fork()'"], 60)
    assert Path("/proc/sys/kernel/pid_max").read_text() == machines  # the run's own, not this
    assert not result.success and not result.timed_out
    assert time.monotonic() - started < 30
    assert result.stderr.endswith(b"runcache: the run exceeded --max-processes 300\n")
    runner.kill_all()


def test_most_processes_at_once_is_the_limit(tmp_path: Path) -> None:
    count = tmp_path / "count"
    runner = Runner(1024, limits=RunLimits(processes=300))
    try:
        result = runner.run(
            [*SHELL, f"while :; do sleep 600 & i=$((i+1)); echo $i > {count}; done"], 60
        )
    finally:
        runner.kill_all()
    assert not result.success and not result.timed_out
    assert count.read_text() == "299\n"  # and the shell itself: 300


def test_the_process_limit_needs_a_namespace_and_is_300_or_more() -> None:
    with pytest.raises(OSError, match="needs a PID namespace"):
        Runner(1024, containment_mode="group", limits=RunLimits(processes=300))
    with pytest.raises(ConfigError, match="^max_processes must be 0 .* or at least 300"):
        Config.load({"max_processes": "299"}, environ={})
