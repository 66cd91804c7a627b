"""What only the SQLite store has to get right: the file, its transactions and its failures.

The cache's rules themselves are checked for every store in ``test_stores.py``, and
the cross-process lock for SQLite and Redis alike in ``test_store_locks.py``.
"""

from __future__ import annotations

import select
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from runcache.errors import ConfigError, StoreError
from runcache.stores import open_store
from runcache.stores.board import open_board
from runcache.stores.sqlite import SqliteStore
from runcache.stores.sqlite_board import SqliteBoard

from conftest import FakeClock


def make(
    opened: list[SqliteStore],
    path: Path,
    namespace: str = "runcache",
    max_entries: int = 100,
    clock: FakeClock | None = None,
) -> SqliteStore:
    store = SqliteStore(path, max_entries, 1 << 20, namespace, clock=clock or FakeClock())
    opened.append(store)
    return store


def test_entries_and_counts_survive_reopening_the_file(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    first = make(opened, db_path)
    assert first.put("k", b'{"v":1}', 60, first.epoch())
    assert first.get("k") == b'{"v":1}'
    first.close()
    again = make(opened, db_path)
    assert again.get("k") == b'{"v":1}'
    stats = again.stats()
    assert (stats.hits, stats.size, stats.bytes) == (2, 1, 7)


def test_file_is_in_wal_mode(db_path: Path, opened: list[SqliteStore]) -> None:
    make(opened, db_path).get("k")
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_stores_on_one_file_share_entries_counts_and_clear(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    one, two = make(opened, db_path), make(opened, db_path)
    one.put("k", b"v", 60, one.epoch())
    assert two.get("k") == b"v"
    assert one.stats().hits == 1
    before = two.clear()
    assert (before.hits, before.size) == (1, 1)
    assert one.get("k") is None
    assert not one.put("late", b"v", 60, 0), "a put from before the clear must be dropped"


def test_namespaces_in_one_file_are_separate(db_path: Path, opened: list[SqliteStore]) -> None:
    team_a, team_b = make(opened, db_path, "team-a"), make(opened, db_path, "team-b")
    team_a.put("k", b"a", 60, team_a.epoch())
    team_b.put("k", b"b", 60, team_b.epoch())
    team_a.clear()
    assert team_b.get("k") == b"b"
    assert team_a.get("k") is None
    assert (team_b.stats().size, team_b.stats().hits) == (1, 1)


def test_bounds_hold_across_stores_sharing_a_file(db_path: Path, opened: list[SqliteStore]) -> None:
    one, two = make(opened, db_path, max_entries=5), make(opened, db_path, max_entries=5)
    for index in range(20):
        store = one if index % 2 else two
        assert store.put(f"k{index}", b"v", 60, store.epoch())
    stats = one.stats()
    assert (stats.size, stats.evictions) == (5, 15)
    assert [one.get(f"k{index}") for index in range(15, 20)] == [b"v"] * 5


def test_stats_sweep_away_lapsed_locks_only(
    db_path: Path, opened: list[SqliteStore], fake_clock: FakeClock
) -> None:
    store = make(opened, db_path, clock=fake_clock)
    assert store.acquire("crashed", 5) is not None
    fake_clock.tick(3)
    assert store.acquire("running", 5) is not None
    fake_clock.tick(3)
    store.stats()
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("SELECT key FROM locks").fetchall() == [("running",)]


def test_a_file_without_the_locks_table_gains_it(db_path: Path, opened: list[SqliteStore]) -> None:
    old = make(opened, db_path)
    assert old.put("k", b"v", 60, old.epoch())
    old.close()
    with closing(sqlite3.connect(db_path)) as db, db:
        db.execute("DROP TABLE locks")
    upgraded = make(opened, db_path)
    assert upgraded.acquire("k", 5) is not None
    assert upgraded.get("k") == b"v"


#: The tables of a file made by runcache before entries carried their command.
_OLD_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, key TEXT NOT NULL,
    size INTEGER NOT NULL, expires_at REAL NOT NULL, used INTEGER NOT NULL,
    UNIQUE (namespace, key)
);
CREATE TABLE "values" (id INTEGER PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE counts (
    namespace TEXT PRIMARY KEY, hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0, evictions INTEGER NOT NULL DEFAULT 0,
    expirations INTEGER NOT NULL DEFAULT 0, coalesced INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0, used INTEGER NOT NULL DEFAULT 0
);
INSERT INTO counts (namespace, entries, bytes, used) VALUES ('runcache', 1, 3, 1);
INSERT INTO entries VALUES (1, 'runcache', 'old', 3, 2000000.0, 1);
INSERT INTO "values" VALUES (1, X'6F6C64');
"""


def test_a_file_from_before_entries_had_commands_keeps_working(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.executescript(_OLD_SCHEMA)
    store = make(opened, db_path)
    (old,) = store.entries("", 0, 10)
    assert (old.key, old.command, old.created_at, old.hits, old.size) == ("old", "", 0, 0, 3)
    assert store.get("old") == b"old"
    assert store.put("new", b"n", 60, store.epoch(), command="echo new")
    assert [info.command for info in store.entries("", 0, 10)] == ["echo new", ""]
    assert store.entries("", 0, 10)[1].hits == 1
    assert store.delete("old") and store.stats().size == 1
    again = make(opened, db_path)  # a later opening finds nothing to add
    assert [info.key for info in again.entries("", 0, 10)] == ["new"]


#: An entry of a file made by runcache before entries had a scope (its columns then).
_BEFORE_SCOPES = """
INSERT INTO counts (namespace, entries, bytes, used) VALUES ('runcache', 1, 3, 1);
INSERT INTO entries (id, namespace, key, size, expires_at, used, command, created_at, hits,
                     return_code)
    VALUES (1, 'runcache', 'old', 3, 2000000.0, 1, 'echo old', 5.0, 0, 0);
INSERT INTO "values" VALUES (1, X'6F6C64');
"""


def test_a_file_from_before_scopes_opens_answers_and_gains_them(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    schema = _OLD_SCHEMA.split("INSERT")[0]
    with closing(sqlite3.connect(db_path)) as db:
        db.executescript(schema)
        for name, definition in (
            ("command", "TEXT NOT NULL DEFAULT ''"),
            ("created_at", "REAL NOT NULL DEFAULT 0"),
            ("hits", "INTEGER NOT NULL DEFAULT 0"),
            ("return_code", "INTEGER NOT NULL DEFAULT 0"),
        ):
            db.execute(f"ALTER TABLE entries ADD COLUMN {name} {definition}")
        db.execute("ALTER TABLE counts ADD COLUMN stale_hits INTEGER NOT NULL DEFAULT 0")
        db.executescript(_BEFORE_SCOPES)
    store = make(opened, db_path)
    assert store.get("old") == b"old"
    (old,) = store.entries("", 0, 10)
    assert (old.key, old.command, old.scope) == ("old", "echo old", "")
    assert store.put("new", b"n", 60, store.epoch(), command="echo new", scope="team-a")
    assert [info.key for info in store.entries("", 0, 10, scope="team-a")] == ["new"]
    assert [info.key for info in store.entries("", 0, 10, scope="")] == ["old"]
    with closing(sqlite3.connect(db_path)) as db:
        indexes = {row[1] for row in db.execute("PRAGMA index_list(entries)")}
    assert "entries_by_scope" in indexes
    assert store.delete_matching(lambda command: True, scope="team-a") == 1
    assert store.get("old") == b"old" and store.stats().size == 1


_FORKER = """
import os
import sys
import time
from pathlib import Path
from runcache.stores.sqlite import SqliteStore

store = SqliteStore(Path(sys.argv[1]), 100, 1 << 20)
store.put("parent", b"p", 60, store.epoch())  # the parent's connection is open
pid = os.fork()
if pid == 0:
    inherited = store._local.connection
    ok = store.get("parent") == b"p" and store.put("child", b"c", 60, store.epoch())
    os._exit(0 if ok and store._local.connection is not inherited else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) or (store.get("child") != b"c"))
"""


def test_forked_child_opens_its_own_connection(db_path: Path) -> None:
    # In a process of its own: forking the multi-threaded test process is unsafe.
    subprocess.run([sys.executable, "-c", _FORKER, str(db_path)], check=True, timeout=60)


_WRITER = """
import sys
import time
from pathlib import Path
from runcache.stores.sqlite import SqliteStore

store = SqliteStore(Path(sys.argv[1]), 50, 1 << 20)
index = 0
while True:
    store.put(f"k{index}", b"x" * (index % 997 + 1), 60, store.epoch())
    store.get(f"k{index // 2}")
    index += 1
    if index == 200:
        print("writing", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_a_consistent_file(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    assert select.select([writer.stdout], [], [], 30)[0], "the writer never started writing"
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    writer.stdout.close()
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        counted = db.execute("SELECT entries, bytes FROM counts").fetchone()
        broken = db.execute(
            'SELECT COUNT(*) FROM entries LEFT JOIN "values" USING (id)'
            " WHERE value IS NULL OR size != LENGTH(value)"
        ).fetchone()
        orphans = db.execute(
            'SELECT COUNT(*) FROM "values" WHERE id NOT IN (SELECT id FROM entries)'
        ).fetchone()
    assert (rows, total) == counted
    assert 0 < rows <= 50
    assert (broken[0], orphans[0]) == (0, 0), "an entry is whole or absent"
    assert make(opened, db_path, max_entries=50).stats().size == rows


def test_corrupt_file_fails_on_use_not_on_open_and_recovers(
    db_path: Path, opened: list[SqliteStore]
) -> None:
    db_path.write_bytes(b"this is not a database" * 100)
    store = make(opened, db_path)
    with pytest.raises(StoreError, match="not a database"):
        store.get("k")
    with pytest.raises(StoreError):
        store.stats()
    db_path.unlink()
    assert store.put("k", b"v", 60, store.epoch())
    assert store.get("k") == b"v"


def test_unwritable_location_fails_on_use_with_the_reason(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = make(opened, blocker / "cache.db")
    with pytest.raises(StoreError, match="cannot create its directory"):
        store.epoch()


def test_missing_directories_are_made(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = make(opened, tmp_path / "deep" / "er" / "cache.db")
    assert store.put("k", b"v", 60, store.epoch())
    assert (tmp_path / "deep" / "er" / "cache.db").is_file()


@pytest.mark.parametrize(
    ("url", "path", "namespace"),
    [
        ("sqlite:///var/cache/rc.db", "/var/cache/rc.db", "runcache"),
        # SQLAlchemy's absolute form: once read as the relative var/cache/rc.db.
        ("sqlite:////var/cache/rc.db", "/var/cache/rc.db", "runcache"),
        ("sqlite://rel/rc.db?namespace=team-a", "rel/rc.db", "team-a"),
    ],
)
def test_url_names_the_file_and_namespace(url: str, path: str, namespace: str) -> None:
    """The cache and the job board of one URL open one file."""
    store = open_store(url, 10, 100)
    assert isinstance(store, SqliteStore)
    assert (store.path, store.namespace) == (Path(path), namespace)
    assert store.description == f"sqlite://{path}?namespace={namespace}"
    board = open_board(url, 10.0, 5.0, 60.0)
    assert isinstance(board, SqliteBoard)
    assert board._path == Path(path)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "names no file"),
        ("sqlite:///x.db?mode=ro", "no options but namespace"),
        ("sqlite:///x.db?namespace=a b", "namespace"),
        ("sqlite:///x.db?namespace=", "namespace"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url, 10, 100)


_OPEN_AT = """
import sys, time
from pathlib import Path
from runcache.stores.sqlite import SqliteStore
start = float(sys.argv[2])
while time.time() < start:
    pass
store = SqliteStore(Path(sys.argv[1]), 10, 1000)
store.put("k", b"v", 60, store.epoch())
store.close()
"""


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """The race to switch a new file to WAL must not fail the losers with "locked"."""
    for round_number in range(5):
        path = tmp_path / f"new-{round_number}.db"
        start = time.time() + 0.5  # far enough for every interpreter to be up and waiting
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT, str(path), str(start)], stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        failures = [process.communicate(timeout=60)[1] for process in processes]
        assert [process.returncode for process in processes] == [0] * 4, failures


_HOLD_LOCK = """
import sys
from pathlib import Path
from runcache.stores.sqlite import SqliteStore
store = SqliteStore(Path(sys.argv[1]), 100, 1 << 20)
print(store.acquire("key", 600.0), flush=True)
sys.stdin.read()
"""


def test_a_lock_whose_owner_process_ended_is_taken_at_once_and_a_live_owners_is_not(
    tmp_path: Path,
) -> None:
    """The lease (600 s here) is for holders on other machines: a holder of this machine
    that has ended (SIGKILL leaves its row) lets the next acquire take the lock at once."""
    path = tmp_path / "cache.db"
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip()
            store = SqliteStore(path, 100, 1 << 20)
            assert store.acquire("key", 600.0) is None  # its holder runs: the lock is its
            holder.kill()
            holder.wait(10)
            token = store.acquire("key", 600.0)
            assert token is not None
            assert store.acquire("key", 600.0) is None  # this process holds it now, and lives
            store.release("key", token)
            store.close()
        finally:
            holder.kill()
