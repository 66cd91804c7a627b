"""``runcache run`` without a server: a cache of its own on this machine (issue 20, item 6).

Every test runs the real ``runcache`` executable with ``XDG_CACHE_HOME`` in its own
temporary directory, so the store is the one a user gets by default, and nothing
of the user's own cache is read or written.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from runcache.config import Config, parse_duration
from runcache.errors import ConfigError

from conftest import LiveServer, until

#: The console script pip installed beside this Python.
RUNCACHE = Path(sys.executable).with_name("runcache")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The cache directory of the runs: ``$XDG_CACHE_HOME`` of every ``runcache`` here."""
    (tmp_path / "xdg").mkdir()
    return tmp_path / "xdg"


def _environment(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    environment["XDG_CACHE_HOME"] = str(home)
    environment.update(extra or {})
    return environment


def runcache(
    home: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``runcache ARGS...`` as a user runs it, with the cache under ``home``."""
    return subprocess.run(
        [str(RUNCACHE), *args],
        capture_output=True,
        env=_environment(home, env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _expiries(home: Path) -> list[float]:
    """When each entry of the user's cache expires, as ``runcache entries`` lists them."""
    listing = orjson.loads(runcache(home, "entries", "--json").stdout)
    assert isinstance(listing, dict)
    return [float(entry["expires_at"]) for entry in listing["entries"]]


# -- a cache of its own ------------------------------------------------------------


def test_the_second_call_is_answered_from_the_user_s_cache(home: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = (
        f"echo run >> {runs}; printf 'out\\n  two'; printf 'err\\r\\n' >&2;"
        " head -c 8 /dev/urandom | od -An -tx1"
    )
    first = runcache(home, "run", command)
    second = runcache(home, "run", command)
    assert first.returncode == second.returncode == 0
    assert (first.stdout, first.stderr) == (second.stdout, second.stderr)
    assert first.stdout.startswith(b"out\n  two") and first.stderr == b"err\r\n"
    assert _lines(runs) == 1  # the command ran once: the second answer is the first's
    assert (home / "runcache" / "cache.db").is_file()


def test_a_nonzero_exit_is_cached_when_asked_and_kept_byte_for_byte(
    home: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = ("sh", "-c", f"echo run >> {runs}; printf 'no match'; printf 'é\\n' >&2; exit 1")
    asked = [runcache(home, "run", "--cache-exit-codes", "0,1", *command) for _ in range(2)]
    assert [(done.returncode, done.stdout, done.stderr) for done in asked] == [
        (1, b"no match", "é\n".encode())
    ] * 2
    assert _lines(runs) == 1
    runcache(home, "run", *command)
    runcache(home, "run", *command)  # exit 1 is no answer by default: both run
    assert _lines(runs) == 3


def test_invalid_utf8_reads_the_same_cached_or_not(home: Path, tmp_path: Path) -> None:
    """Output is text on the wire: bytes that are not UTF-8 become U+FFFD, the same
    whether the answer ran or came from the cache (docs/cli.md says so)."""
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; printf 'a\\377\\376b\\n'; printf '\\377' >&2"
    live, cached = runcache(home, "run", command), runcache(home, "run", command)
    replaced = "\ufffd".encode()
    assert live.stdout == cached.stdout == b"a" + replaced * 2 + b"b\n"
    assert live.stderr == cached.stderr == replaced
    assert _lines(runs) == 1


def test_output_that_is_not_utf8_is_printed_once_while_followed(home: Path, tmp_path: Path) -> None:
    """A live page of bytes that are not UTF-8 counts raw bytes, the final pages count
    the stored text: the follower holds what follows the first bad byte until the end,
    rather than print it twice (it did: "a\ufffdb" then "b" again)."""
    gate = tmp_path / "gate"
    opener = threading.Timer(1.5, gate.touch)  # after the follower read the live page
    opener.start()
    try:
        done = runcache(
            home,
            "run",
            "--no-cache",
            f"printf 'a\\377b\\n'; while [ ! -e {gate} ]; do sleep 0.05; done; echo c",
        )
    finally:
        opener.cancel()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a\ufffdb\nc\n".encode()


def test_identical_concurrent_calls_run_once(home: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; sleep 1; echo done; wc -l < {runs}"
    calls = [
        subprocess.Popen(
            [str(RUNCACHE), "run", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(home),
        )
        for _ in range(5)
    ]
    answers = [(call.wait(60), *call.communicate()) for call in calls]
    assert answers == [(0, b"done\n1\n", b"")] * 5
    assert _lines(runs) == 1


def test_an_input_that_changes_is_a_new_answer(home: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("first\n")
    ask = ("run", "--input", "notes.txt", "cat", "notes.txt")
    assert runcache(home, *ask, cwd=tmp_path).stdout == b"first\n"
    notes.write_text("second\n")
    assert runcache(home, *ask, cwd=tmp_path).stdout == b"second\n"
    assert runcache(home, *ask, cwd=tmp_path).stdout == b"second\n"
    assert len(_expiries(home)) == 2  # one per content of notes.txt


def test_the_store_is_chosen_by_flag_and_shared_by_the_other_commands(
    home: Path, tmp_path: Path
) -> None:
    store = tmp_path / "elsewhere.db"
    done = runcache(home, "run", "--store", f"sqlite://{store}", "echo", "hi")
    assert done.stdout == b"hi\n" and store.is_file()
    assert not (home / "runcache").exists()
    runcache(home, "run", "echo", "mine")
    stats = orjson.loads(runcache(home, "stats", "--json").stdout)
    assert (stats["size"], stats["misses"]) == (1, 1)  # the user's store, not elsewhere.db


def test_a_short_lived_call_leaves_no_job_board_or_files_behind(home: Path) -> None:
    assert runcache(home, "run", "echo", "x").returncode == 0
    assert runcache(home, "run", "echo", "x").returncode == 0
    folder = home / "runcache"
    # The cache's file and SQLite's own companions, nothing else: the hit's light path
    # (runcache.client.cached) exits without the checkpoint that closing would cost,
    # leaving the -wal and -shm for the store's next writer.
    assert {path.name for path in folder.iterdir()} <= {"cache.db", "cache.db-wal", "cache.db-shm"}
    with sqlite3.connect(folder / "cache.db") as database:
        tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
    assert not any(name.startswith("board") for name in tables), tables


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h", 3600), ("1d", 86400), ("0.5", 0.5), ("2.5m", 150)],
)
def test_durations_take_units(text: str, seconds: float) -> None:
    assert parse_duration(text, "--ttl") == seconds


def test_a_duration_without_a_unit_it_knows_is_refused_naming_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^--ttl must be a duration such as 90s.*'5w'$"):
        parse_duration("5w", "--ttl")
    found = Config.load(environ={"RUNCACHE_DEFAULT_TTL": "2m", "RUNCACHE_MAX_STALE": "1d"})
    assert (found.default_ttl, found.max_stale) == (120, 86400)


def test_ttl_5m_keeps_the_result_five_minutes(home: Path) -> None:
    before = time.time()
    assert runcache(home, "run", "--ttl", "5m", "echo", "five").returncode == 0
    [expires_at] = _expiries(home)
    assert 299 < expires_at - before < 301 + (time.time() - before)


def test_a_default_ttl_in_the_environment_takes_units(home: Path) -> None:
    before = time.time()
    runcache(home, "run", "echo", "env", env={"RUNCACHE_DEFAULT_TTL": "90s"})
    [expires_at] = _expiries(home)
    assert 89 < expires_at - before < 91 + (time.time() - before)


def test_a_bad_duration_is_refused_and_nothing_runs(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = runcache(home, "run", "--ttl", "5 minutes", "touch", str(marker))
    assert done.returncode == 2 and b"'5 minutes' is not a duration" in done.stderr
    assert not marker.exists()


# -- the command line --------------------------------------------------------------


def test_one_argument_with_spaces_runs_as_shell_text(home: Path) -> None:
    done = runcache(home, "run", "for i in 1 2; do echo $i; done | wc -l")
    assert (done.returncode, done.stdout.strip()) == (0, b"2")


def test_an_unknown_option_before_the_command_is_refused_and_nothing_runs(
    home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    done = runcache(home, "run", "--tll", "5m", "touch", str(marker))
    assert done.returncode == 2 and b"No such option" in done.stderr
    assert not marker.exists()


def test_options_after_the_command_are_the_command_s(home: Path) -> None:
    done = runcache(home, "run", "echo", "--ttl", "5m", "-h", "--warm")
    assert (done.returncode, done.stdout) == (0, b"--ttl 5m -h --warm\n")


def test_dash_h_is_help(home: Path) -> None:
    done = runcache(home, "run", "-h")
    assert done.returncode == 0 and b"--warm" in done.stdout and b"DURATION" in done.stdout


# -- refreshing in the background ----------------------------------------------------


def test_warm_answers_from_the_cache_and_refreshes_after_it_exits(
    home: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    assert runcache(home, "run", command).stdout == b"1\n"
    [stored] = _expiries(home)
    warm = runcache(home, "run", "--warm", command)
    assert (warm.returncode, warm.stdout) == (0, b"1\n")  # the cached answer, at once
    until(lambda: _expiries(home)[0] > stored, what="the refresh to be stored")
    assert runcache(home, "run", command).stdout == b"2\n"
    assert _lines(runs) == 2  # one refresh, and the answers since are its result


def test_warm_through_a_server_leaves_the_refresh_to_it(
    home: Path, tmp_path: Path, live_server: LiveServer
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    through = {"RUNCACHE_URL": live_server.url}
    assert runcache(home, "run", command, env=through).stdout == b"1\n"
    warm = runcache(home, "run", "--warm", command, env=through)
    assert (warm.returncode, warm.stdout) == (0, b"1\n")
    until(lambda: runcache(home, "run", command, env=through).stdout == b"2\n")
    assert _lines(runs) == 2
    assert not (home / "runcache").exists()  # the server's cache, not this machine's


def test_warm_with_nothing_cached_runs_the_command_once(home: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    assert runcache(home, "run", "--warm", command).stdout == b"1\n"
    assert runcache(home, "run", command).stdout == b"1\n"
    assert _lines(runs) == 1


def test_a_stale_answer_is_refreshed_by_a_process_that_outlives_the_call(
    home: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    assert runcache(home, "run", "--ttl", "0.2", command).stdout == b"1\n"
    until(lambda: all(expires_at < time.time() for expires_at in _expiries(home)))
    stale = runcache(home, "run", "--stale", "1h", command)
    assert (stale.returncode, stale.stdout) == (0, b"1\n")
    # Waited for in the listing: a run asked meanwhile without --stale would run it too.
    until(lambda: all(expires_at > time.time() for expires_at in _expiries(home)))
    assert runcache(home, "run", command).stdout == b"2\n"
    assert _lines(runs) == 2


def test_a_scope_is_a_cache_of_its_own_and_warm_refreshes_it(home: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    assert runcache(home, "run", command).stdout == b"1\n"
    assert runcache(home, "run", "--scope", "team-a", command).stdout == b"2\n"
    assert runcache(home, "run", "--scope", "team-a", command).stdout == b"2\n"

    def scoped() -> list[dict[str, object]]:
        listing = orjson.loads(runcache(home, "entries", "--scope", "team-a", "--json").stdout)
        assert isinstance(listing, dict)
        entries: list[dict[str, object]] = listing["entries"]
        return entries

    [stored] = scoped()
    warm = runcache(home, "run", "--warm", "--scope", "team-a", command)
    assert (warm.returncode, warm.stdout) == (0, b"2\n")
    # The detached refresh stored its result in the scope, not beside it.
    until(lambda: [entry["created_at"] for entry in scoped()] > [stored["created_at"]])
    assert runcache(home, "run", "--scope", "team-a", command).stdout == b"3\n"
    assert runcache(home, "run", command).stdout == b"1\n"
    assert runcache(home, "invalidate", "--scope", "team-a").stdout == b"deleted 1 entry\n"
    assert runcache(home, "run", command).stdout == b"1\n" and _lines(runs) == 3
