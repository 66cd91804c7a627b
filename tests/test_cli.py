"""The client commands, run as the real ``runcache`` executable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import pytest

from conftest import LiveServer, free_port

#: The console script pip installed beside this Python.
RUNCACHE = Path(sys.executable).with_name("runcache")


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
    done = runcache("run", "--", "exec", "sh", "-c", "kill -KILL $$")
    assert done.returncode == 128 + 9


def test_terminating_run_kills_the_command_it_runs_in_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    process = subprocess.Popen(
        [str(RUNCACHE), "run", "--", "sh", "-c", f"echo $$ > {pid_file}.new; "
         f"mv {pid_file}.new {pid_file}; exec sleep 60"],
        env=environment,
    )
    while not pid_file.exists():
        assert process.poll() is None
        time.sleep(0.01)
    command = psutil.Process(int(pid_file.read_text()))
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
    first = runcache("run", "--", "sh", "-c", "echo $$", env=env)
    second = runcache("run", "--", "sh", "-c", "echo $$", env=env)
    fresh = runcache("run", "--no-cache", "--", "sh", "-c", "echo $$", env=env)
    assert first.returncode == second.returncode == fresh.returncode == 0
    assert first.stdout == second.stdout != fresh.stdout
    stats = orjson.loads(runcache("stats", "--json", "--server", live_server.url).stdout)
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 1, 1)


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
