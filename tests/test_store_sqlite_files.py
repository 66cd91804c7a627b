"""The SQLite store's file changed behind its back: deleted, replaced, its ``-shm`` broken.

As reported: a database file deleted while servers ran left them serving the deleted
file and reporting healthy, while a new server on the path started empty (clears no
longer reached each other); and a ``-shm`` that could not be used killed the server
with SIGBUS and no log line. These use real files in ``tmp_path`` and real servers.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import requests

from runcache.errors import StoreError
from runcache.stores import sqlite_files
from runcache.stores.sqlite import LOOK_INTERVAL, SqliteStore
from runcache.stores.sqlite_files import SHM_REGION

from conftest import FakeClock, LiveServer


def make(opened: list[SqliteStore], path: Path) -> SqliteStore:
    """A store that looks at its file on every call (by default, at most every 10 ms)."""
    store = SqliteStore(path, 100, 1 << 20, clock=FakeClock(), look_interval=0)
    opened.append(store)
    return store


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        result: str = db.execute("PRAGMA integrity_check").fetchone()[0]
        return result


def test_a_deleted_file_is_noticed_then_the_path_is_reopened_and_shared(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    old = make(opened, db_path)
    assert old.put("before", b"v", 60, old.epoch())
    in_thread: list[bytes | None] = []
    worker = threading.Thread(target=lambda: in_thread.append(old.get("before")))
    worker.start()  # a second connection, of another thread, on the file to be deleted
    worker.join()
    assert in_thread == [b"v"]
    db_path.unlink()
    with pytest.raises(StoreError, match="deleted"):
        old.get("before")
    # Reopened: the path holds a new file, which a new store shares with the old one.
    assert old.get("before") is None
    assert old.put("after", b"w", 60, old.epoch())
    new = make(opened, db_path)
    assert new.get("after") == b"w"
    new.clear()
    assert old.get("after") is None, "a clear on the new store reaches the old one"
    worker = threading.Thread(target=lambda: in_thread.append(old.get("after")))
    worker.start()  # the other thread's connection was closed and reopens the path too
    worker.join()
    assert in_thread == [b"v", None]
    assert old.stats().size == new.stats().size == 0
    assert integrity(db_path) == "ok"


def test_a_file_replaced_by_another_is_noticed_then_the_other_is_served(
    tmp_path: Path, db_path: Path, opened: list[SqliteStore]
) -> None:
    old = make(opened, db_path)
    for index in range(20):  # frames in the WAL, which must not be replayed into the new file
        assert old.put(f"mine-{index}", b"m" * 1000, 60, old.epoch())
    other = make([], tmp_path / "other.db")
    assert other.put("theirs", b"t", 60, other.epoch())
    other.close()
    os.replace(tmp_path / "other.db", db_path)
    with pytest.raises(StoreError, match="replaced"):
        old.get("mine-1")
    assert old.get("theirs") == b"t"
    assert old.get("mine-1") is None
    new = make(opened, db_path)
    assert new.get("theirs") == b"t"
    old.clear()
    assert new.get("theirs") is None
    assert integrity(db_path) == "ok"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("suffix", ["-shm", "-wal"])
def test_a_companion_sqlite_cannot_use_is_refused_by_name_then_used_once_gone(
    db_path: Path, opened: list[SqliteStore], kind: str, suffix: str
) -> None:
    """Root writes any file whatever its mode, so these are what root cannot write."""
    broken = db_path.with_name(db_path.name + suffix)
    os.mkdir(broken) if kind == "directory" else os.mkfifo(broken)
    store = make(opened, db_path)
    with pytest.raises(StoreError, match=f"cache.db{suffix} is not a regular file"):
        store.epoch()
    with pytest.raises(StoreError, match="not a regular file"):
        store.put("k", b"v", 60, 0)
    os.rmdir(broken) if kind == "directory" else os.unlink(broken)
    assert store.put("k", b"v", 60, store.epoch())
    assert store.get("k") == b"v"


_TRUNCATE_SHM = """
import os, sys, time
from pathlib import Path
from runcache.errors import StoreError
from runcache.stores.sqlite import LOOK_INTERVAL, SqliteStore

path = Path(sys.argv[1])
shm = path.with_name(path.name + "-shm")
store = SqliteStore(path, 100, 1 << 20)
store.put("k", b"v", 60, store.epoch())
os.truncate(shm, 0)  # under the mapping: touching it now would be SIGBUS
time.sleep(store.look_interval * 2)  # the call after a look's interval looks again
for attempt in range(2):
    try:
        store.get("k")
        print("served")
    except StoreError as error:
        print("refused:", error)
for name in (path, shm, path.with_name(path.name + "-wal")):
    name.unlink()
store.put("k", b"again", 60, store.epoch())
print("reopened:", store.get("k"))
store.close()
"""


def test_a_shm_truncated_under_its_mapping_is_an_error_not_sigbus(db_path: Path) -> None:
    """In a process of its own, so that a fault kills that process, not the test run;
    it must end normally, its connections on the faulty file left untouched for good."""
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_SHM, str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, lines
    assert "-shm file truncated while mapped" in lines[0] and "SIGBUS" in lines[0]
    assert "truncated under this process's mapping" in lines[1]
    assert lines[2] == "reopened: b'again'"
    assert SHM_REGION == 32 * 1024


_FAULT = """
import os, sys
from pathlib import Path
from runcache.stores.sqlite import LOOK_INTERVAL, SqliteStore

path = Path(sys.argv[1])
store = SqliteStore(path, 100, 1 << 20)
store.put("k", b"v", 60, store.epoch())
os.truncate(path.with_name(path.name + "-shm"), 0)
store._local.connection.execute("SELECT 1 FROM entries")  # past the store's look: faults
"""


def test_a_fault_past_the_look_still_leaves_a_line(db_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FAULT, str(db_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -7, (done.returncode, done.stderr)  # SIGBUS
    assert "Fatal Python error: Bus error" in done.stderr, done.stderr


# -- real servers -------------------------------------------------------------------------


def run(server: LiveServer, command: str) -> dict[str, Any]:
    response = requests.post(server.url + "/api/command", json={"command": command}, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def health(server: LiveServer) -> dict[str, Any]:
    answer: dict[str, Any] = requests.get(server.url + "/health", timeout=30).json()
    return answer


def wait_for_status(server: LiveServer, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        answer = health(server)
        if answer["status"] == status:
            return answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)


def test_servers_on_a_deleted_file_notice_then_share_the_new_one(
    live_server_factory: Callable[..., LiveServer], db_path: Path
) -> None:
    old = live_server_factory("--store", f"sqlite://{db_path}")
    run(old, "echo $$")
    assert run(old, "echo $$")["cached"] is True
    db_path.unlink()
    time.sleep(LOOK_INTERVAL * 5)  # a call within the interval of the last look does not look
    assert run(old, "echo $$")["cached"] is False  # noticed: run uncached
    reason = wait_for_status(old, "degraded")["reason"]
    assert "deleted" in reason and str(db_path) in reason, reason
    wait_for_status(old, "healthy")  # the path reopened
    assert any("was deleted while open" in line for line in old.output)
    new = live_server_factory("--store", f"sqlite://{db_path}")
    first = run(new, "echo shared")
    again = run(old, "echo shared")
    assert (first["cached"], again["cached"]) == (False, True)
    assert again["stdout"] == first["stdout"]
    cleared = requests.post(new.url + "/api/cache/clear", timeout=30)
    assert cleared.status_code == 200, cleared.text
    assert run(old, "echo shared")["cached"] is False, "the clear reached the old server"
    assert integrity(db_path) == "ok"


def test_an_idle_server_lets_go_of_a_deleted_file_for_a_new_one(
    live_server_factory: Callable[..., LiveServer], db_path: Path
) -> None:
    """Without a call to notice it, the idle server's look at the file lets it go: until
    then a new server on the path shares its -wal and -shm and fails."""
    old = live_server_factory("--store", f"sqlite://{db_path}")
    run(old, "echo shared")
    db_path.unlink()
    new = live_server_factory("--store", f"sqlite://{db_path}")
    deadline = time.monotonic() + 30
    while not run(new, "echo shared")["cached"]:
        assert time.monotonic() < deadline, health(new)
        time.sleep(0.1)
    assert run(old, "echo shared")["cached"] is False  # the first call says the file went
    reason = wait_for_status(old, "degraded")["reason"]
    # Replaced if the new server had made its file when the old one looked, else deleted.
    assert re.search(r"was (replaced|deleted) while open", reason), reason
    wait_for_status(old, "healthy")
    assert run(old, "echo shared")["cached"] is True
    cleared = requests.post(old.url + "/api/cache/clear", timeout=30)
    assert cleared.status_code == 200, cleared.text
    assert run(new, "echo shared")["cached"] is False
    assert integrity(db_path) == "ok"


def test_a_server_whose_shm_is_a_directory_says_why_and_keeps_answering(
    live_server_factory: Callable[..., LiveServer], db_path: Path
) -> None:
    shm = db_path.with_name(db_path.name + "-shm")
    shm.mkdir(parents=True)
    server = live_server_factory("--store", f"sqlite://{db_path}")
    assert [run(server, "echo hi")["cached"] for _ in range(2)] == [False, False]
    reason = wait_for_status(server, "degraded")["reason"]
    assert f"{shm} is not a regular file" in reason, reason
    assert any("cache store failed" in line and "-shm" in line for line in server.output)
    shm.rmdir()
    wait_for_status(server, "healthy")
    run(server, "echo hi")
    assert run(server, "echo hi")["cached"] is True
    assert server.process.poll() is None


_HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, held until this process ends
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_file_another_process_holds_costs_each_request_at_most_the_store_timeout(
    live_server_factory: Callable[..., LiveServer], db_path: Path
) -> None:
    """SQLite's hang: a process that took the write lock and stopped (here: waits). Each
    call waits for it at most --store-timeout, then the store rests as a failed one."""
    server = live_server_factory("--store", f"sqlite://{db_path}", "--store-timeout", "0.5")
    run(server, "echo hit")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        for command in ("echo hit", "echo miss", "echo hit"):
            start = time.monotonic()
            assert run(server, command)["cached"] is False
            assert time.monotonic() - start < 3, "was 5 s a call (SQLite's busy timeout)"
        assert "locked" in wait_for_status(server, "degraded")["reason"]
    finally:
        holder.communicate("", timeout=30)
    wait_for_status(server, "healthy")
    assert run(server, "echo hit")["cached"] is True


def test_checking_the_companions_keeps_this_processs_locks_on_them(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it: a
    check that opened the -shm let another worker truncate it under SQLite's mapping
    (SIGBUS on the first hits of two workers on a new file)."""
    database = tmp_path / "cache.db"
    shm = tmp_path / "cache.db-shm"
    shm.write_bytes(b"\0" * 32768)
    with open(shm, "r+b") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        sqlite_files.check_companions(database)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, sys\n"
                f"f = open({str(shm)!r}, 'r+b')\n"
                "try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)\n"
                "except OSError:\n    sys.exit(3)\n",
            ],
            timeout=30,
            check=False,
        )
        assert probe.returncode == 3, "the lock was dropped: another process took it"
