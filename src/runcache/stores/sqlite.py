"""A store in one SQLite file: results survive a restart, and processes on one machine share them.

The file holds the entries and the counts of every namespace. Each thread has
its own connection (SQLite connections must not be shared between threads
mid-transaction); a forked child opens its own instead of reusing its parent's.
The database runs in WAL mode, so readers never wait for the writer, and every
change is one ``BEGIN IMMEDIATE`` transaction: a process killed mid-write leaves
the previous state, never half an entry or counts that disagree with the entries.

The single-flight lock is a row of the ``locks`` table, taken and given up in
such transactions too, so identical requests arriving at several processes at
once run once. A row carries its expiry on the store's clock; a holder that
crashed leaves a row that the next :meth:`SqliteStore.acquire` of its key finds
lapsed and replaces. A row also names its owner, the process that took it (this
machine's boot, PID namespace, pid and the process's start time): an
``acquire`` that finds the key held by a process of this machine that is gone
(a worker killed with SIGKILL, which the supervisor restarts) takes the lock at
once instead of waiting for its lease, which lasts as long as the command may.

A file that cannot be opened, written or read (a missing directory that cannot
be made, a corrupt file) raises :class:`StoreError` on use, never at start, so
the server still starts and runs uncached until the file is usable again. So
does a file deleted or replaced under the store, once, before the store reopens
the path; and a ``-shm`` file truncated under its mapping, which SQLite would
answer with SIGBUS (see :mod:`runcache.stores.sqlite_files`).
"""

from __future__ import annotations

import faulthandler
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runcache.errors import StoreError
from runcache.stores import sqlite_files
from runcache.stores.base import (
    DEFAULT_TIMEOUT,
    CacheStats,
    CommandMatch,
    EntryInfo,
    is_stale,
    stats_from_counts,
)

#: Tables shared by every namespace. ``used`` orders entries from least to most
#: recently used; ``counts.used`` is the namespace's counter that hands it out.
#: Values live apart from ``entries`` because SQLite rewrites a whole row on any
#: update: marking a hit as recently used must not rewrite a megabyte of output.
#: ``IF NOT EXISTS`` also adds to a file made by an older runcache the tables it
#: lacks (``locks`` came later), as every new connection runs this script.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL,
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS entries_by_use ON entries (namespace, used);
CREATE INDEX IF NOT EXISTS entries_by_expiry ON entries (namespace, expires_at);
CREATE TABLE IF NOT EXISTS "values" (id INTEGER PRIMARY KEY, value BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_drop_value AFTER DELETE ON entries
BEGIN
    DELETE FROM "values" WHERE id = old.id;
END;
CREATE TABLE IF NOT EXISTS counts (
    namespace TEXT PRIMARY KEY,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    evictions INTEGER NOT NULL DEFAULT 0,
    expirations INTEGER NOT NULL DEFAULT 0,
    coalesced INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS locks (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

#: Columns ``entries`` and ``counts`` gained after their first release, and their definitions. Every
#: file gets them the same way, a new one just after its tables are made and one
#: made by an older runcache when first opened by this one: its entries then list
#: with an empty command, stored at time 0, as having served no hits yet.
_ADDED_COLUMNS = {
    "entries": {
        "command": "TEXT NOT NULL DEFAULT ''",
        "created_at": "REAL NOT NULL DEFAULT 0",
        "hits": "INTEGER NOT NULL DEFAULT 0",
        "return_code": "INTEGER NOT NULL DEFAULT 0",
        "scope": "TEXT NOT NULL DEFAULT ''",
    },
    "counts": {"stale_hits": "INTEGER NOT NULL DEFAULT 0"},
}

#: Indexes on added columns, made once the columns are: an invalidation by scope reads
#: that scope's rows, not the whole table.
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS entries_by_scope ON entries (namespace, scope);"

#: What :class:`EntryInfo` is made of, in its order.
_INFO = "key, command, size, created_at, expires_at, hits, return_code, scope"

#: Seconds a thread's calls go without looking at the file after a look. The look
#: is two ``stat`` calls, 2.6 µs, against a hit's 40 µs in the store (150 µs over
#: HTTP); at most a hundred looks a second per thread make it nothing.
LOOK_INTERVAL = 0.01

#: Seconds between looks at the file by a store nobody calls (a call looks itself):
#: an idle server must let go of a deleted file too, or a new server on the path
#: shares its -wal and -shm and fails ("disk I/O error") until the idle one is called.
WATCH_INTERVAL = 1.0

_COUNTS = (
    "SELECT hits, misses, evictions, expirations, coalesced, entries, bytes, stale_hits FROM counts"
)


class _ThreadConnection(threading.local):
    connection: sqlite3.Connection | None = None
    pid: int = 0
    #: The file the connection opened.
    identity: sqlite_files.Identity = (0, 0)
    #: The store's generation it was opened in; those of older ones are closed.
    generation: int = 0
    #: When (time.monotonic) this thread's next call looks at the file.
    next_look: float = 0.0


class SqliteStore:
    """The cache's rules kept in SQL, one short transaction per operation."""

    #: Every call reads or writes the file, and may wait for another process's write.
    blocking = True

    def __init__(
        self,
        path: Path,
        max_entries: int,
        max_bytes: int,
        namespace: str = "runcache",
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        look_interval: float = LOOK_INTERVAL,
        retain: float = 0.0,
    ) -> None:
        #: Seconds an expired entry is kept for readers that accept a stale answer.
        self.retain = retain
        self.path = path
        #: Seconds a thread's calls go without looking whether the file changed.
        self.look_interval = look_interval
        #: The database's and its -shm's names, as the looks on every call want them.
        self._file = os.fspath(path)
        self._shm = self._file + "-shm"
        #: Seconds a call waits for another process's write (SQLite's busy timeout).
        self.timeout = timeout
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.description = f"sqlite://{path}?namespace={namespace}"
        self._clock = clock
        self._local = _ThreadConnection()
        # Threads of one process queue here rather than in SQLite's busy handler,
        # which polls with sleeps and can starve a thread for its whole timeout;
        # other processes still wait in the busy handler. Every call holds it,
        # reads too (they are short), so a thread that finds the file replaced can
        # close every connection of the store: none is in use. Reentrant because a
        # transaction may open its thread's connection, which writes the schema.
        self._write_lock = threading.RLock()
        #: Every open connection of this process, and the file it opened.
        self._opened: dict[sqlite3.Connection, sqlite_files.Identity] = {}
        self._opened_lock = threading.Lock()
        #: Advanced when the connections are closed for the file's sake.
        self._generation = 0
        #: Files whose -shm was truncated under this process's mapping: never opened again.
        self._faulty: set[sqlite_files.Identity] = set()
        #: What the watcher found the file had gone through, for the next call to say.
        self._found: str | None = None
        self._watcher_pid = 0
        self._closed = threading.Event()

    # -- the cache's operations -------------------------------------------------

    def get(self, key: str) -> bytes | None:
        found = self.get_stale(key, 0.0)
        return None if found is None else found[0]

    def get_stale(self, key: str, stale: float) -> tuple[bytes, bool] | None:
        now = self._clock()
        with self._transaction() as db:
            # A hit is one statement that finds, checks and touches the entry; its
            # WHERE is the rule of an answer (runcache.stores.base.answers).
            hit = db.execute(
                "UPDATE entries SET used = (SELECT used + 1 FROM counts WHERE namespace = ?),"
                " hits = hits + 1 WHERE namespace = ? AND key = ? AND expires_at > ?"
                " RETURNING id, expires_at",
                (self.namespace, self.namespace, key, now - stale),
            ).fetchall()
            if hit:
                expired = is_stale(hit[0][1], now)
                self._count(db, hits=1, used=1, **({"stale_hits": 1} if expired else {}))
                (value,) = db.execute(
                    'SELECT value FROM "values" WHERE id = ?', (hit[0][0],)
                ).fetchone()
                return bytes(value), expired
            # An expired entry is kept while retained, for a reader that accepts it
            # stale (even while this reader's run refreshes it).
            gone = db.execute(
                "DELETE FROM entries WHERE namespace = ? AND key = ? AND NOT expires_at > ?"
                " RETURNING size",
                (self.namespace, key, now - self.retain),
            ).fetchall()
            if gone:
                self._count(db, misses=1, expirations=1, entries=-1, bytes=-gone[0][0])
            else:
                self._count(db, misses=1)
            return None

    async def get_async(self, key: str) -> bytes | None:
        # In place on the loop: one short transaction costs less than the hop to
        # a thread and back. It can wait while another process (or a put in a
        # thread of this one) writes; that is rare, and as short as their write.
        return self.get(key)

    def put(
        self,
        key: str,
        value: bytes,
        ttl: float,
        epoch: int,
        command: str = "",
        return_code: int = 0,
        scope: str = "",
    ) -> bool:
        size = len(value)
        if size > self.max_bytes:
            return False
        now = self._clock()
        with self._transaction() as db:
            (current,) = db.execute(
                "SELECT epoch FROM counts WHERE namespace = ?", (self.namespace,)
            ).fetchone()
            if current != epoch:
                return False
            replaced = db.execute(
                "DELETE FROM entries WHERE namespace = ? AND key = ? RETURNING size, expires_at",
                (self.namespace, key),
            ).fetchall()
            old_size = replaced[0][0] if replaced else 0
            self._count(
                db,
                used=1,
                entries=0 if replaced else 1,
                bytes=size - old_size,
                expirations=int(bool(replaced) and replaced[0][1] <= now),
            )
            added = db.execute(
                "INSERT INTO entries (namespace, key, size, expires_at, used, command,"
                " created_at, return_code, scope)"
                " VALUES (?, ?, ?, ?, (SELECT used FROM counts WHERE namespace = ?), ?, ?, ?, ?)",
                (
                    self.namespace,
                    key,
                    size,
                    now + ttl,
                    self.namespace,
                    command,
                    now,
                    return_code,
                    scope,
                ),
            )
            db.execute('INSERT INTO "values" (id, value) VALUES (?, ?)', (added.lastrowid, value))
            self._shrink_to_bounds(db, now)
        return True

    def _shrink_to_bounds(self, db: sqlite3.Connection, now: float) -> None:
        # The least recently used entry goes first; if it had already expired,
        # that is an expiration, not an eviction.
        while True:
            entries, total = db.execute(
                "SELECT entries, bytes FROM counts WHERE namespace = ?", (self.namespace,)
            ).fetchone()
            if entries <= self.max_entries and total <= self.max_bytes:
                return
            entry_id, size, expires_at = db.execute(
                "SELECT id, size, expires_at FROM entries WHERE namespace = ?"
                " ORDER BY used LIMIT 1",
                (self.namespace,),
            ).fetchone()
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            expired = expires_at <= now
            self._count(
                db,
                entries=-1,
                bytes=-size,
                expirations=int(expired),
                evictions=int(not expired),
            )

    def epoch(self) -> int:
        with self._reading() as db:
            row = db.execute(
                "SELECT epoch FROM counts WHERE namespace = ?", (self.namespace,)
            ).fetchone()
        return int(row[0])

    def peek(self, key: str) -> bytes | None:
        with self._reading() as db:
            row = db.execute(
                'SELECT value FROM entries JOIN "values" USING (id)'
                " WHERE namespace = ? AND key = ? AND expires_at > ?",
                (self.namespace, key, self._clock()),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def entries(
        self, prefix: str, offset: int, limit: int, scope: str | None = None
    ) -> list[EntryInfo]:
        # Newest first by id: a put inserts its row anew, and SQLite gives a new
        # row the id one above the largest in the table.
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_INFO} FROM entries WHERE namespace = ? AND expires_at > ?"
                " AND substr(command, 1, length(?)) = ? AND (? IS NULL OR scope = ?)"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (self.namespace, self._clock(), prefix, prefix, scope, scope, limit, offset),
            ).fetchall()
        return [EntryInfo(*row) for row in rows]

    def entry(self, key: str) -> tuple[EntryInfo, bytes] | None:
        with self._reading() as db:
            row = db.execute(
                f'SELECT {_INFO}, value FROM entries JOIN "values" USING (id)'
                " WHERE namespace = ? AND key = ? AND expires_at > ?",
                (self.namespace, key, self._clock()),
            ).fetchone()
        return None if row is None else (EntryInfo(*row[:-1]), bytes(row[-1]))

    def delete(self, key: str) -> bool:
        with self._transaction() as db:
            return self._delete_where(db, "key = ?", key) == 1

    def delete_matching(self, match: CommandMatch, scope: str | None = None) -> int:
        # One transaction, as a clear is: the rows are small (values live apart).
        with self._transaction() as db:
            db.create_function("runcache_match", 1, match, deterministic=True)
            if scope is None:
                return self._delete_where(db, "runcache_match(command)")
            return self._delete_where(db, "scope = ? AND runcache_match(command)", scope)

    def _delete_where(self, db: sqlite3.Connection, condition: str, *args: Any) -> int:
        """Delete the live entries of this namespace that meet ``condition`` (this
        module's own SQL, never input), keeping the counts; how many went."""
        deleted = db.execute(
            f"DELETE FROM entries WHERE namespace = ? AND expires_at > ? AND {condition}"
            " RETURNING size",
            (self.namespace, self._clock(), *args),
        ).fetchall()
        if deleted:
            self._count(db, entries=-len(deleted), bytes=-sum(size for (size,) in deleted))
        return len(deleted)

    def acquire(self, key: str, lease: float) -> str | None:
        token = f"{_owner()}/{secrets.token_hex(16)}"
        with self._transaction() as db:
            # The clock is read inside the transaction, after any wait for
            # another process's write, so the lease starts when the lock does.
            now = self._clock()
            db.execute(
                "DELETE FROM locks WHERE namespace = ? AND key = ? AND expires_at < ?",
                (self.namespace, key, now),
            )
            taken = db.execute(
                "INSERT OR IGNORE INTO locks (namespace, key, token, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (self.namespace, key, token, now + lease),
            ).rowcount
            if not taken and self._holder_gone(db, key):
                db.execute(
                    "UPDATE locks SET token = ?, expires_at = ? WHERE namespace = ? AND key = ?",
                    (token, now + lease, self.namespace, key),
                )
                taken = 1
        return token if taken else None

    def _holder_gone(self, db: sqlite3.Connection, key: str) -> bool:
        """Whether ``key``'s lock is held by a process of this machine that has ended."""
        row = db.execute(
            "SELECT token FROM locks WHERE namespace = ? AND key = ?", (self.namespace, key)
        ).fetchone()
        return row is not None and _owner_gone(row[0].rpartition("/")[0])

    def release(self, key: str, token: str) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM locks WHERE namespace = ? AND key = ? AND token = ?",
                (self.namespace, key, token),
            )

    def record_coalesced(self) -> None:
        with self._transaction() as db:
            self._count(db, coalesced=1)

    def clear(self) -> CacheStats:
        with self._transaction() as db:
            before = self._snapshot(db)
            # Locks stay, as in Redis: the commands holding them are still running,
            # and their twins must keep waiting rather than run them again.
            db.execute("DELETE FROM entries WHERE namespace = ?", (self.namespace,))
            db.execute(
                "UPDATE counts SET hits = 0, misses = 0, evictions = 0, expirations = 0,"
                " coalesced = 0, stale_hits = 0, entries = 0, bytes = 0, used = 0,"
                " epoch = epoch + 1"
                " WHERE namespace = ?",
                (self.namespace,),
            )
        return before

    def stats(self) -> CacheStats:
        with self._transaction() as db:
            now = self._clock()
            # So that ``size`` and ``bytes`` count only entries that could be served
            # (stale ones too, while they are retained).
            purged = db.execute(
                "DELETE FROM entries WHERE namespace = ? AND expires_at <= ? RETURNING size",
                (self.namespace, now - self.retain),
            ).fetchall()
            # Locks left by crashed holders of keys nobody asked for again.
            db.execute(
                "DELETE FROM locks WHERE namespace = ? AND expires_at < ?", (self.namespace, now)
            )
            if purged:
                freed = sum(size for (size,) in purged)
                self._count(db, expirations=len(purged), entries=-len(purged), bytes=-freed)
            return self._snapshot(db)

    async def aclose(self) -> None:
        """Nothing is opened for the loop: ``get_async`` uses the loop thread's connection."""

    def close(self) -> None:
        self._closed.set()
        with self._opened_lock:
            opened, self._opened = self._opened, {}
        for connection in opened:
            connection.close()
        self._local.connection = None

    # -- SQL helpers ----------------------------------------------------------------

    def _count(self, db: sqlite3.Connection, **changes: int) -> None:
        """Add to the namespace's counts; the names are this module's own, never input."""
        assignments = ", ".join(f"{name} = {name} + ?" for name in changes)
        db.execute(
            f"UPDATE counts SET {assignments} WHERE namespace = ?",
            (*changes.values(), self.namespace),
        )

    def _snapshot(self, db: sqlite3.Connection) -> CacheStats:
        row: tuple[Any, ...] = db.execute(
            _COUNTS + " WHERE namespace = ?", (self.namespace,)
        ).fetchone()
        return stats_from_counts(row, self.max_entries, self.max_bytes)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._reading() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, on the file now at the path, with the store's other
        calls in this process kept out; any SQLite failure becomes a StoreError."""
        # Bounded: a thread stuck in SQLite's busy handler holds the lock for up to
        # the timeout itself, and a queue of threads must not add theirs up.
        if not self._write_lock.acquire(timeout=self.timeout):
            raise StoreError(
                f"sqlite store {self.path}: busy: another call waited over"
                f" the store timeout ({self.timeout:g} s) for the file"
            )
        try:
            yield self._connection()
        except sqlite3.Error as error:
            self._discard()
            raise StoreError(f"sqlite store {self.path}: {error}") from error
        finally:
            self._write_lock.release()

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        found, self._found = self._found, None
        if found is not None:
            raise StoreError(_changed_message(self.path, found))
        if (
            local.connection is not None
            and local.pid == os.getpid()
            and local.generation == self._generation
        ):
            now = time.monotonic()
            if now >= local.next_look:
                local.next_look = now + self.look_interval
                try:
                    change = sqlite_files.changed(self._file, self._shm, local.identity)
                except OSError as error:
                    raise sqlite3.OperationalError(f"cannot look at the file: {error}") from error
                if change is not None:
                    self._let_go(local.identity, change)
            return local.connection
        local.connection = None  # the parent's (after a fork), or closed by _let_go
        local.connection, local.identity = self._connect()
        local.pid = os.getpid()
        local.generation = self._generation
        return local.connection

    def _let_go(self, opened: sqlite_files.Identity, change: str) -> None:
        """Stop using every connection, as the file it opened ``change``; raise StoreError."""
        self._release_all(opened, change)
        raise StoreError(_changed_message(self.path, change))

    def _release_all(self, opened: sqlite_files.Identity, change: str) -> None:
        """Stop using every connection, as the file ``opened`` ``change``.

        The next call reopens the path. A connection on a replaced or deleted file
        is closed: SQLite then neither checkpoints into it nor deletes the ``-wal``
        and ``-shm`` at the path, which may be another file's by now. Its WAL is
        first checkpointed and emptied, where SQLite still can, so that no frame of
        the old file is replayed into the one now at the path. A connection whose
        ``-shm`` was truncated is abandoned instead: touching it would be SIGBUS.
        """
        with self._opened_lock:
            opened_connections, self._opened = self._opened, {}
        self._generation += 1
        self._local.connection = None
        if change == sqlite_files.TRUNCATED:
            self._faulty.add(opened)
            for connection in opened_connections:
                sqlite_files.abandon(connection)
            return
        for connection in opened_connections:
            try:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            connection.close()

    def _watch(self) -> None:
        """In a thread of its own, while the store is open: look at the file every
        WATCH_INTERVAL seconds, and let go of it as a call would, when no call is under way
        (one that is looks itself). The next call says what happened."""
        while not self._closed.wait(WATCH_INTERVAL):
            if not self._write_lock.acquire(blocking=False):
                continue
            try:
                with self._opened_lock:
                    opened = set(self._opened.values())
                for identity in opened:
                    change = sqlite_files.changed(self._file, self._shm, identity)
                    if change is not None:
                        self._release_all(identity, change)
                        self._found = change
                        break
            except (OSError, sqlite3.Error):
                pass  # the next call finds it out and says so
            finally:
                self._write_lock.release()

    def _connect(self) -> tuple[sqlite3.Connection, sqlite_files.Identity]:
        """A new connection on the file at the path, and that file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise sqlite3.OperationalError(f"cannot create its directory: {error}") from error
        try:
            if sqlite_files.identity(self.path) in self._faulty:
                raise sqlite3.OperationalError(
                    "its -shm file was truncated under this process's mapping: remove the"
                    " database file and its -wal and -shm, or restart runcache"
                )
        except OSError:
            pass  # none yet, or one SQLite will say what is wrong with
        sqlite_files.check_companions(self.path)
        sqlite_files.create_private(self.path)
        # isolation_level=None: this module issues BEGIN and COMMIT itself.
        db = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            with self._write_lock:
                _retry_while_locked(lambda: self._prepare(db), self.timeout)
            opened = sqlite_files.identity(self.path)
        except FileNotFoundError as error:
            db.close()
            raise sqlite3.OperationalError(f"the file went as it was opened: {error}") from error
        except BaseException:
            db.close()
            raise
        with self._opened_lock:
            self._opened[db] = opened
        if self._watcher_pid != os.getpid():  # none yet, or the parent's before a fork
            self._watcher_pid = os.getpid()
            if not faulthandler.is_enabled():
                # A -shm truncated between the look before a call and SQLite's touch
                # still faults: let the SIGBUS leave a line and a stack, not nothing.
                faulthandler.enable()
            threading.Thread(target=self._watch, name="runcache-sqlite-watch", daemon=True).start()
        return db, opened

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Set up a new connection and make sure the file has the tables and this namespace."""
        db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL still commits atomically; it only skips an fsync
        # per commit, so a power cut may lose the last commits, never corrupt.
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        _add_columns(db)
        db.executescript(_ADDED_INDEXES)
        db.execute("INSERT OR IGNORE INTO counts (namespace) VALUES (?)", (self.namespace,))

    def _discard(self) -> None:
        # After a failure, start the next attempt on a fresh connection: the file
        # may have been replaced, repaired or made writable meanwhile.
        connection, self._local.connection = self._local.connection, None
        if connection is None:
            return
        with self._opened_lock:
            self._opened.pop(connection, None)
        try:
            connection.close()
        except sqlite3.Error:
            pass


def _changed_message(path: Path, change: str) -> str:
    if change == sqlite_files.TRUNCATED:
        return (
            f"sqlite store {path} {change}: runcache no longer touches this file (SQLite"
            " would crash the process with SIGBUS); remove the database file and its -wal"
            " and -shm, or restart runcache"
        )
    return f"sqlite store {path} {change} while open: reopening the path"


def _add_columns(db: sqlite3.Connection) -> None:
    """Give ``entries`` and ``counts`` the columns of ``_ADDED_COLUMNS`` they lack.

    Looked for again inside a write transaction, which processes take one at a
    time, so two processes opening an old file at once add each column once.
    """
    if _missing_columns(db):
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, name in _missing_columns(db):
                definition = _ADDED_COLUMNS[table][name]
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _missing_columns(db: sqlite3.Connection) -> list[tuple[str, str]]:
    missing = []
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        missing += [(table, name) for name in columns if name not in have]
    return missing


def _owner() -> str:
    """The process taking a lock, as :func:`_owner_gone` can check it later on this machine:
    ``boot:pid namespace:pid:start time`` (the start time tells a reused pid apart); empty
    where /proc cannot say, and such a lock lasts its lease."""
    pid = os.getpid()
    try:
        return f"{_machine()}:{pid}:{_started(pid)}"
    except (OSError, ValueError, IndexError):
        return ""


def _machine() -> str:
    """This boot of this machine, and the PID namespace its pids are numbered in."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}:{os.readlink('/proc/self/ns/pid')}"


def _started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot); "" for a zombie, which has ended."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command's name, which may hold spaces
    return "" if fields[0] in ("Z", "X") else fields[19]


def _owner_gone(owner: str) -> bool:
    """Whether the lock's ``owner`` is a process of this machine that has ended. An owner
    of another machine (or boot, or PID namespace), or unknown, is never taken for gone."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return False
    machine, pid, started = parts
    try:
        if machine != _machine():
            return False
    except OSError:
        return False
    try:
        return _started(int(pid)) != started
    except FileNotFoundError:  # no such process
        return True
    except (OSError, ValueError, IndexError):
        return False


def _retry_while_locked(step: Callable[[], None], timeout: float) -> None:
    """Run ``step``, retrying while another process holds the file to itself.

    Processes opening a new file at the same moment race to switch it to WAL,
    and SQLite answers the loser "database is locked" at once, without calling
    the busy handler; so wait here as the handler would, up to ``timeout``.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
