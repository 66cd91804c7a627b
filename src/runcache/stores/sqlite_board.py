"""The job board in the SQLite file of the cache: for the workers of one machine.

Its own tables, created if absent, in the same file (WAL mode, so readers never
wait for the writer): ``board_jobs`` (each job's record, and when the reaper
marked it failed), ``board_output`` (chunks of output in the order written, and an
end row when a job ends; the row's id is a reader's cursor), ``board_control``
(requests to an instance and their answers) and ``board_instances`` (each
instance's last heartbeat).

The processes sharing the file are on one machine, so a reader that waits asks
again every :data:`POLL_SECONDS`: each ask is one indexed query run in a thread,
cheap when nothing changed, and the wait is bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgspec

from runcache.errors import StoreError
from runcache.stores.board import (
    STOPPED_ANSWERING,
    Chunk,
    ControlAnswer,
    ControlRequest,
    JobRecord,
    Update,
    instance_name,
)

#: How often a waiting reader, requester or inbox asks the file again.
POLL_SECONDS = 0.02

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

    # -- records ----------------------------------------------------------------------

    async def publish(self, record: JobRecord) -> None:
        await self._write(
            "INSERT OR REPLACE INTO board_jobs (namespace, job_id, started_at, ended_at,"
            " instance, record, reaped) VALUES (?, ?, ?, NULL, ?, ?, NULL)",
            (self._namespace, record.job_id, record.started_at, record.instance, _encode(record)),
        )

    async def append(self, job_id: str, chunks: list[Chunk]) -> None:
        rows = [(self._namespace, job_id, stream, offset, data) for stream, offset, data in chunks]

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO board_output (namespace, job_id, stream, offset, data)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        await self._call(write)

    async def end(self, record: JobRecord) -> None:
        horizon = time.time() - self.retention

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE board_jobs SET ended_at = ?, record = ? WHERE namespace = ? AND job_id = ?"
                " AND reaped IS NULL",
                (record.ended_at, _encode(record), self._namespace, record.job_id),
            )
            db.execute(
                "INSERT INTO board_output (namespace, job_id, ended) VALUES (?, ?, 1)",
                (self._namespace, record.job_id),
            )
            self._forget_before(db, horizon)

        await self._call(write)

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

        return await self._polled(read, lambda update: bool(update.chunks or update.ended), timeout)

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

        return await self._polled(read, bool, timeout)

    async def answer(self, request: ControlRequest, answer: ControlAnswer) -> None:
        await self._write(
            "UPDATE board_control SET answer = ? WHERE id = ?",
            (_encode(answer), int(request.reply)),
        )

    # -- liveness ---------------------------------------------------------------------

    async def heartbeat(self) -> None:
        await self._write(
            "INSERT OR REPLACE INTO board_instances (namespace, instance, seen) VALUES (?, ?, ?)",
            (self._namespace, self.instance, time.time()),
        )

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
                if record.cacheable:
                    _release_lease(db, self._namespace, record.cache_key)
            db.execute(
                "DELETE FROM board_instances WHERE namespace = ? AND seen < ?",
                (self._namespace, now - self.instance_timeout),
            )
            return [job_id for job_id, _ in rows]

        return await self._call(reap)

    async def aclose(self) -> None:
        return None

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
        self, read: Callable[[sqlite3.Connection], T], enough: Callable[[T], bool], timeout: float
    ) -> T:
        """``read`` again every POLL_SECONDS until ``enough`` of what it found, or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = await self._call(read)
            if enough(found) or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))

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
            raise StoreError(f"job board sqlite://{self._path}: {error}") from error

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
            db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._local.db = db
        return db


def _record(body: bytes, reaped: float | None) -> JobRecord:
    record = _decode_record(body)
    if reaped is not None and record.ended_at is None:
        record.status, record.error, record.ended_at = "failed", STOPPED_ANSWERING, reaped
    return record


def _release_lease(db: sqlite3.Connection, namespace: str, key: str) -> None:
    """Give up the single-flight lock of a reaped job's key (the cache store's ``locks``
    row), so an instance waiting to run the same command takes it now."""
    try:
        db.execute("DELETE FROM locks WHERE namespace = ? AND key = ?", (namespace, key))
    except sqlite3.OperationalError:  # no locks table: the cache never took a lock here
        pass
