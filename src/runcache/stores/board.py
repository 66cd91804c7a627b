"""The job board: the jobs of every instance sharing a store, as records all of them read.

With a shared store (``sqlite://`` for the workers of one machine, ``redis://``
for servers on many) a job is the deployment's, not a process's: the instance
that runs a job publishes its record here as it starts, its output as it is
printed, its status as it is paused or resumed and its result when it ends, so
that any instance answers about it. Control (cancel, pause, resume, leave)
asked on another instance travels through the board to the instance running
the job, which applies it and answers. Each instance keeps a heartbeat; every
instance reaps the running jobs of an instance silent for longer than the
instance timeout, marking them failed with :data:`STOPPED_ANSWERING` and
releasing their cache lease, so nothing stays ``running`` forever.

The memory store has no board (:func:`open_board` answers None): its jobs stay
in the one process, as they always did.

Every method is a coroutine run on the engine's loop; a board that cannot be
reached raises :class:`~runcache.errors.StoreError`.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

import msgspec

#: What the reaper writes on the jobs of an instance that went silent.
STOPPED_ANSWERING = "the instance running this job stopped answering"

#: The verbs another instance may ask of the instance running a job.
Verb = Literal["cancel", "pause", "resume", "leave"]

#: Seconds between an instance's heartbeats, and between its reaper's rounds.
HEARTBEAT_SECONDS = 2.0


def instance_name() -> str:
    """This server process as the board names it: ``host:pid`` (what a listing shows)
    and a random suffix, so a restarted process that got the same pid differs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobRecord(msgspec.Struct, kw_only=True):
    """One job as the board keeps it: what a listing, a detail and a remote reader need."""

    job_id: str
    command: str
    cache_key: str
    #: The instance running the job (:func:`instance_name`).
    instance: str
    status: str
    pid: int | None = None
    #: Wall clock seconds (every instance reads them, on any machine).
    started_at: float
    ended_at: float | None = None
    owners: list[str] = []
    cacheable: bool = False
    #: The token of the single-flight lock its run holds (set once taken): the reaper
    #: releases that lock only while this token still holds it.
    lease: str | None = None
    background: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    last_output: str = ""
    return_code: int | None = None
    error: str | None = None
    #: The stored result's JSON, once ended with one, and the flags its answer carries.
    body: str | None = None
    cached: bool = False
    coalesced: bool = False
    stale: bool = False
    #: The pool whose worker runs it (its queue while it waits): such a job is reaped
    #: by its pool's claim (:mod:`runcache.stores.redis_pools`), not the board's reaper.
    pool: str | None = None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


#: One piece of a job's output: its stream (``stdout``/``stderr``), its offset, its bytes.
Chunk = tuple[str, int, bytes]


@dataclass
class Round:
    """What one publishing round of an instance writes, in one transaction: the output
    its running jobs printed since the last round, the records of those whose record is
    due, and the final records of those that ended (written after their last output)."""

    output: list[tuple[str, list[Chunk]]] = field(default_factory=list)
    records: list[JobRecord] = field(default_factory=list)
    ended: list[JobRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.output or self.records or self.ended)


@dataclass(frozen=True)
class Update:
    """What a wait on a job's output found after a cursor: the cursor after it, the new
    chunks, and whether the job's end (or the reaper's) was marked."""

    cursor: str
    chunks: list[Chunk]
    ended: bool


class ControlRequest(msgspec.Struct):
    """A verb asked of the instance running ``job_id``; the answer goes to ``reply``."""

    reply: str
    job_id: str
    verb: str


class ControlAnswer(msgspec.Struct):
    """Whether the runner did the verb, and the job's status after."""

    done: bool
    status: str


class JobBoard(Protocol):
    """The jobs of every instance that shares a store (one per server process)."""

    #: This process's name on the board (:func:`instance_name`).
    instance: str
    #: Seconds of silence after which an instance's running jobs are reaped.
    instance_timeout: float
    #: Seconds an ended job stays listed (``--job-retention``).
    retention: float

    async def write(self, batch: Round) -> None:
        """Write a round in one transaction: the output appended to each job's, the
        running jobs' records (replacing what was there), then the ended jobs' final
        records, each with its end marked for waiting readers and kept ``retention``
        seconds."""

    async def publish(self, record: JobRecord) -> None:
        """Write one running job's record (a round of one)."""

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def listing(self) -> list[JobRecord]:
        """Every instance's jobs, newest first: running ones, and those ended within
        ``retention`` seconds."""

    async def wait(self, job_id: str, cursor: str, timeout: float) -> Update:
        """The output added after ``cursor`` (``"0"``: from the start), waiting up to
        ``timeout`` seconds for some (or for the end) when there is none yet."""

    async def control(self, record: JobRecord, verb: str, timeout: float) -> ControlAnswer | None:
        """Ask the instance running ``record``'s job to do ``verb``; its answer, or None
        when it did not answer within ``timeout``."""

    async def inbox(self, timeout: float) -> list[ControlRequest]:
        """The control requests sent to this instance, waiting up to ``timeout`` for one."""

    async def answer(self, request: ControlRequest, answer: ControlAnswer) -> None: ...

    async def heartbeat(self) -> bool:
        """Say this instance is alive for the next ``instance_timeout`` seconds; whether
        its previous heartbeat was still there (False the first time, and after the
        store lost it: a restarted Redis, or a silence the reaper saw)."""

    async def reap(self) -> list[str]:
        """Mark failed the running jobs of instances silent past the timeout, mark their
        ends and release their cache leases (the lock of a key only while the reaped
        job's token holds it); the ids of the jobs reaped."""

    async def aclose(self) -> None: ...


def open_board(
    url: str, instance_timeout: float, timeout: float, retention: float
) -> JobBoard | None:
    """The board of the store ``url`` names: SQLite's or Redis's, None for memory (whose
    jobs stay in their process). ``timeout`` bounds each call that does not wait;
    ended jobs are kept ``retention`` seconds."""
    from runcache.stores import _split_namespace, sqlite_file

    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from runcache.stores.sqlite_board import SqliteBoard

        path, namespace = sqlite_file(url)
        return SqliteBoard(str(path), namespace, instance_timeout, timeout, retention)
    if scheme in ("redis", "rediss"):
        from runcache.stores.redis_board import RedisBoard

        rest, namespace = _split_namespace(url)
        return RedisBoard(rest, namespace, instance_timeout, timeout, retention)
    return None
