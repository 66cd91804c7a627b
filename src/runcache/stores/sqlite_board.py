"""The job board in the SQLite file of the cache: for the workers of one machine.

Its own tables, created if absent, in the same file (WAL mode, so readers never
wait for the writer): ``board_jobs`` (each job's record, and when the reaper
marked it failed), ``board_output`` (chunks of output in the order written, and an
end row when a job ends; the row's id is a reader's cursor), ``board_control``
(requests to an instance and their answers) and ``board_instances`` (each
instance's last heartbeat).

The processes sharing the file are on one machine, so waiting is polling, done
once for the process: one thread (:class:`_Poller`) asks the file every
:data:`POLL_SECONDS` whether anything was committed and which jobs got output,
and wakes the waits that concern them, which then read what they wait for. A
wait is bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgspec

from runcache.errors import StoreError
from runcache.stores import sqlite_files
from runcache.stores.board import (
    STOPPED_ANSWERING,
    ControlAnswer,
    ControlRequest,
    JobRecord,
    Round,
    Update,
    instance_name,
)

log = logging.getLogger("runcache")

#: How often the poller asks the file whether anything changed.
POLL_SECONDS = 0.01

#: What a wait on a new control request (an inbox) and one on any commit (a requester
#: waiting for its answer, an update) are woken by: job ids are hex, never these.
REQUESTS: str | None = None
ANY = "*"

#: Records listed at the most (finished jobs are listed up to 1,000).
_LISTED = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS board_jobs (
  namespace TEXT NOT NULL, job_id TEXT NOT NULL, started_at REAL NOT NULL,
  ended_at REAL, instance TEXT NOT NULL, record BLOB NOT NULL, reaped REAL,
  PRIMARY KEY (namespace, job_id)
);
CREATE INDEX IF NOT EXISTS board_jobs_running ON board_jobs (namespace, ended_at);
CREATE TABLE IF NOT EXISTS board_output (
  id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, job_id TEXT NOT NULL,
  stream TEXT, offset INTEGER, data BLOB, ended INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS board_output_by_job ON board_output (namespace, job_id, id);
CREATE TABLE IF NOT EXISTS board_control (
  id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, instance TEXT NOT NULL,
  job_id TEXT NOT NULL, verb TEXT NOT NULL, answer BLOB
);
CREATE INDEX IF NOT EXISTS board_control_by_instance ON board_control (namespace, instance, id);
CREATE TABLE IF NOT EXISTS board_instances (
  namespace TEXT NOT NULL, instance TEXT NOT NULL, seen REAL NOT NULL,
  PRIMARY KEY (namespace, instance)
);
"""

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(JobRecord).decode
_decode_answer = msgspec.json.Decoder(ControlAnswer).decode


class SqliteBoard:
    """The job board of the processes sharing one SQLite file and namespace."""

    def __init__(
        self,
        path: str,
        namespace: str,
        instance_timeout: float,
        timeout: float,
        retention: float,
    ) -> None:
        self.instance = instance_name()
        self.instance_timeout = instance_timeout
        self.retention = retention
        self._path = Path(path)
        self._namespace = namespace
        self._timeout = timeout
        self._local = threading.local()
        self._inbox_cursor = 0
        self._poller = _Poller(self._open, namespace)

    # -- records ----------------------------------------------------------------------

    async def write(self, batch: Round) -> None:
        namespace = self._namespace
        output = [
            (namespace, job_id, stream, offset, data)
            for job_id, chunks in batch.output
            for stream, offset, data in chunks
        ]
        records = [
            (namespace, record.job_id, record.started_at, record.instance, _encode(record))
            for record in batch.records
        ]
        ended = [
            (record.ended_at, _encode(record), namespace, record.job_id) for record in batch.ended
        ]
        horizon = time.time() - self.retention

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO board_output (namespace, job_id, stream, offset, data)"
                " VALUES (?, ?, ?, ?, ?)",
                output,
            )
            db.executemany(
                "INSERT OR REPLACE INTO board_jobs (namespace, job_id, started_at, ended_at,"
                " instance, record, reaped) VALUES (?, ?, ?, NULL, ?, ?, NULL)",
                records,
            )
            if ended:
                db.executemany(
                    "UPDATE board_jobs SET ended_at = ?, record = ? WHERE namespace = ?"
                    " AND job_id = ? AND reaped IS NULL",
                    ended,
                )
                db.executemany(
                    "INSERT INTO board_output (namespace, job_id, ended) VALUES (?, ?, 1)",
                    [(namespace, record.job_id) for record in batch.ended],
                )
                self._forget_before(db, horizon)

        await self._call(write)

    async def publish(self, record: JobRecord) -> None:
        await self.write(Round(records=[record]))

    async def get(self, job_id: str) -> JobRecord | None:
        def read(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute(
                "SELECT record, reaped FROM board_jobs WHERE namespace = ? AND job_id = ?",
                (self._namespace, job_id),
            ).fetchone()
            return None if row is None else _record(row[0], row[1])

        return await self._call(read)

    async def listing(self) -> list[JobRecord]:
        horizon = time.time() - self.retention

        def read(db: sqlite3.Connection) -> list[JobRecord]:
            rows = db.execute(
                "SELECT record, reaped FROM board_jobs WHERE namespace = ?"
                " AND (ended_at IS NULL OR ended_at >= ?) ORDER BY started_at DESC LIMIT ?",
                (self._namespace, horizon, _LISTED),
            ).fetchall()
            return [_record(body, reaped) for body, reaped in rows]

        return await self._call(read)

    # -- output -----------------------------------------------------------------------

    async def wait(self, job_id: str, cursor: str, timeout: float) -> Update:
        after = int(cursor)

        def read(db: sqlite3.Connection) -> Update:
            rows = db.execute(
                "SELECT id, stream, offset, data, ended FROM board_output"
                " WHERE namespace = ? AND job_id = ? AND id > ? ORDER BY id",
                (self._namespace, job_id, after),
            ).fetchall()
            chunks = [
                (stream, offset, bytes(data))
                for _, stream, offset, data, ended in rows
                if not ended
            ]
            last = str(rows[-1][0]) if rows else cursor
            return Update(last, chunks, any(row[4] for row in rows))

        return await self._polled(
            read, lambda update: bool(update.chunks or update.ended), timeout, job_id
        )

    # -- control ----------------------------------------------------------------------

    async def control(self, record: JobRecord, verb: str, timeout: float) -> ControlAnswer | None:
        def ask(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO board_control (namespace, instance, job_id, verb) VALUES (?, ?, ?, ?)",
                (self._namespace, record.instance, record.job_id, verb),
            )
            return int(cursor.lastrowid or 0)

        request = await self._call(ask)

        def answered(db: sqlite3.Connection) -> ControlAnswer | None:
            row = db.execute("SELECT answer FROM board_control WHERE id = ?", (request,)).fetchone()
            return None if row is None or row[0] is None else _decode_answer(row[0])

        found = await self._polled(answered, lambda answer: answer is not None, timeout)
        await self._write("DELETE FROM board_control WHERE id = ?", (request,))
        return found

    async def inbox(self, timeout: float) -> list[ControlRequest]:
        def read(db: sqlite3.Connection) -> list[ControlRequest]:
            rows = db.execute(
                "SELECT id, job_id, verb FROM board_control"
                " WHERE namespace = ? AND instance = ? AND id > ? ORDER BY id",
                (self._namespace, self.instance, self._inbox_cursor),
            ).fetchall()
            if rows:
                self._inbox_cursor = rows[-1][0]
            return [ControlRequest(str(row_id), job_id, verb) for row_id, job_id, verb in rows]

        return await self._polled(read, bool, timeout, REQUESTS)

    async def answer(self, request: ControlRequest, answer: ControlAnswer) -> None:
        await self._write(
            "UPDATE board_control SET answer = ? WHERE id = ?",
            (_encode(answer), int(request.reply)),
        )

    # -- liveness ---------------------------------------------------------------------

    async def heartbeat(self) -> bool:
        def beat(db: sqlite3.Connection) -> bool:
            parameters = (time.time(), self._namespace, self.instance)
            if db.execute(
                "UPDATE board_instances SET seen = ? WHERE namespace = ? AND instance = ?",
                parameters,
            ).rowcount:
                return True
            db.execute(
                "INSERT INTO board_instances (seen, namespace, instance) VALUES (?, ?, ?)",
                parameters,
            )
            return False

        return await self._call(beat)

    async def reap(self) -> list[str]:
        now = time.time()

        def reap(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT job_id, record FROM board_jobs j WHERE namespace = ?"
                " AND ended_at IS NULL AND reaped IS NULL AND NOT EXISTS (SELECT 1 FROM"
                " board_instances i WHERE i.namespace = j.namespace AND i.instance = j.instance"
                " AND i.seen >= ?)",
                (self._namespace, now - self.instance_timeout),
            ).fetchall()
            for job_id, body in rows:
                record = _decode_record(body)
                db.execute(
                    "UPDATE board_jobs SET reaped = ?, ended_at = ? WHERE namespace = ?"
                    " AND job_id = ?",
                    (now, now, self._namespace, job_id),
                )
                db.execute(
                    "INSERT INTO board_output (namespace, job_id, ended) VALUES (?, ?, 1)",
                    (self._namespace, job_id),
                )
                if record.cacheable and record.lease is not None:
                    _release_lease(db, self._namespace, record.cache_key, record.lease)
            db.execute(
                "DELETE FROM board_instances WHERE namespace = ? AND seen < ?",
                (self._namespace, now - self.instance_timeout),
            )
            return [job_id for job_id, _ in rows]

        return await self._call(reap)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._poller.stop)

    # -- helpers ----------------------------------------------------------------------

    def _forget_before(self, db: sqlite3.Connection, horizon: float) -> None:
        """Drop the jobs that ended before ``horizon``, and their output."""
        db.execute(
            "DELETE FROM board_output WHERE namespace = ? AND job_id IN (SELECT job_id FROM"
            " board_jobs WHERE namespace = ? AND ended_at < ?)",
            (self._namespace, self._namespace, horizon),
        )
        db.execute(
            "DELETE FROM board_jobs WHERE namespace = ? AND ended_at < ?",
            (self._namespace, horizon),
        )

    async def _polled(
        self,
        read: Callable[[sqlite3.Connection], T],
        enough: Callable[[T], bool],
        timeout: float,
        job_id: str | None = ANY,
    ) -> T:
        """``read`` until ``enough`` of what it found, or timeout: again each time the
        poller sees a change (new output of ``job_id``, or :data:`REQUESTS`, :data:`ANY`)."""
        deadline = time.monotonic() + timeout
        while True:
            # Watched before reading: a commit after the read wakes the wait.
            woken = self._poller.watch(job_id)
            try:
                found = await self._call(read)
                left = deadline - time.monotonic()
                if enough(found) or left <= 0:
                    return found
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken, left)
            finally:
                self._poller.forget(woken, job_id)

    async def _write(self, sql: str, parameters: tuple[object, ...]) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(sql, parameters)

        await self._call(write)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._in_transaction, work)

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._transaction() as db:
                return work(db)
        except sqlite3.Error as error:
            self._let_go()
            raise StoreError(f"job board sqlite://{self._path}: {error}") from error

    def _let_go(self) -> None:
        """Close this thread's connection after a failure: one SQLite opened while its
        -shm could not be (read-only, say) would keep the file so for every connection of
        this process, the cache's too, until closed."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (SQLite's must not cross threads mid-transaction)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    def _open(self) -> sqlite3.Connection:
        sqlite_files.create_private(self._path)
        db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()  # not left open read-only (see _let_go)
            raise
        return db


#: Seconds the poller waits before opening the file again after it failed.
RETRY_SECONDS = 1.0


class _Poller:
    """One thread per board that asks the file every :data:`POLL_SECONDS` whether anything
    was committed (``PRAGMA data_version``, which SQLite changes when another connection
    commits: cheap enough to ask often) and, when something was, which jobs got output
    since; it wakes the waits on those jobs, and every control wait. So a hundred
    followers cost one query a tick between them, and a quiet file a pragma."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], namespace: str) -> None:
        self._connect = connect
        self._namespace = namespace
        self._lock = threading.Lock()
        #: The waits: on a job's output (by its id), on a new control request
        #: (:data:`REQUESTS`), on any commit (:data:`ANY`).
        self._waits: dict[str | None, set[asyncio.Future[None]]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def watch(self, job_id: str | None) -> asyncio.Future[None]:
        """A future that is done once ``job_id`` has new output (:data:`REQUESTS`: once a
        control request is sent; :data:`ANY`: once anything was committed), the thread
        started if it is not yet."""
        woken = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waits.setdefault(job_id, set()).add(woken)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="runcache-board-poller", daemon=True
                )
                self._thread.start()
        return woken

    def forget(self, woken: asyncio.Future[None], job_id: str | None) -> None:
        with self._lock:
            waits = self._waits.get(job_id)
            if waits is not None:
                waits.discard(woken)
                if not waits:
                    del self._waits[job_id]

    def stop(self) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(5)

    def _run(self) -> None:
        """Poll until stopped; a file that fails (SQLite's error) is let go and opened
        again a second later, so a fault that passes (a -shm made a directory, a disk
        full) stops nobody's wake-ups for good."""
        while not self._stopping.is_set():
            self._poll()
            self._stopping.wait(RETRY_SECONDS)

    def _poll(self) -> None:
        try:
            db = self._connect()
        except sqlite3.Error:
            log.warning("job board poller cannot open the file; trying again", exc_info=True)
            return
        try:
            version = db.execute("PRAGMA data_version").fetchone()[0]
            last = db.execute("SELECT COALESCE(MAX(id), 0) FROM board_output").fetchone()[0]
            requests = self._last_request(db)
            with self._lock:  # what was committed before ``last`` was read is looked at again
                first = list(self._waits)
            self._wake(first)
            while not self._stopping.wait(POLL_SECONDS):
                now = db.execute("PRAGMA data_version").fetchone()[0]
                if now == version:
                    continue
                version = now
                rows = db.execute(
                    "SELECT job_id, MAX(id) FROM board_output WHERE id > ? AND namespace = ?"
                    " GROUP BY job_id",
                    (last, self._namespace),
                ).fetchall()
                last = max([last, *(row[1] for row in rows)])
                keys: list[str | None] = [ANY, *(row[0] for row in rows)]
                if (now_requests := self._last_request(db)) != requests:
                    requests = now_requests
                    keys.append(REQUESTS)
                self._wake(keys)
        except sqlite3.Error:  # the waits still end at their timeouts meanwhile
            log.warning("job board poller failed; opening the file again", exc_info=True)
        finally:
            db.close()

    def _last_request(self, db: sqlite3.Connection) -> int:
        found: int = db.execute("SELECT COALESCE(MAX(id), 0) FROM board_control").fetchone()[0]
        return found

    def _wake(self, keys: list[str | None]) -> None:
        with self._lock:
            woken = [wait for key in keys for wait in self._waits.pop(key, ())]
        for wait in woken:
            wait.get_loop().call_soon_threadsafe(_done, wait)


def _done(wait: asyncio.Future[None]) -> None:
    if not wait.done():
        wait.set_result(None)


def _record(body: bytes, reaped: float | None) -> JobRecord:
    record = _decode_record(body)
    if reaped is not None and record.ended_at is None:
        record.status, record.error, record.ended_at = "failed", STOPPED_ANSWERING, reaped
    return record


def _release_lease(db: sqlite3.Connection, namespace: str, key: str, token: str) -> None:
    """Give up the single-flight lock of a reaped job's key (the cache store's ``locks``
    row), so an instance waiting to run the same command takes it now; only while the
    reaped job's token holds it (it may have lapsed and been taken by another run)."""
    try:
        db.execute(
            "DELETE FROM locks WHERE namespace = ? AND key = ? AND token = ?",
            (namespace, key, token),
        )
    except sqlite3.OperationalError:  # no locks table: the cache never took a lock here
        pass
