"""The audit log: one JSON line for each command request and each deletion from the cache.

Who ran what, when, as which credential, and what came of it, in a file of its
own (``--audit-log PATH``), apart from the server log. Each line is a JSON
object: ``time`` (ISO 8601, UTC: when the line was written, at most one turn
of the event loop after the answer), ``action`` (``command``, ``clear``, ``delete`` or
``invalidate``), ``client`` (the peer's address), ``credential`` (``anonymous``,
``token`` or ``admin``: which token the request presented, never the token),
``identity`` (whose token it was: its name in the token file, a short digest of
it, ``admin`` or ``anonymous``; :mod:`runcache.web.auth`), and the action's own
fields (:class:`CommandRecord`, :class:`RemovalRecord`). No command output is
ever written here: a command line carries the output's size.

The HTTP layer (and MCP's in-process backend) knows the caller, so it writes the
records; every record is built in this module, when its request is answered.

Writing. The lines of one turn of the event loop are written together at its
end, with one ``write()`` on a descriptor opened with ``O_APPEND`` (about seven
lines a write under load). The kernel appends a write whole, so several worker
processes (``--workers N``) can share the file without splitting or
interleaving lines. The price: a process killed with SIGKILL loses the lines of
its last turn (microseconds' worth), which may include answers already sent; a
server that stops writes them out.

Rotation at ``max_bytes`` keeps ``KEPT_FILES`` old files (``PATH.1`` is the
newest); the process that rotates holds an ``fcntl`` lock on ``PATH.lock``
while it renames. Every process looks at ``PATH`` before each write (one
``stat``): is it still the file it has open, and would the write take it past
``max_bytes``? It reopens the file when another process rotated it (or someone
moved or removed it by hand).
:class:`logging.handlers.RotatingFileHandler` was not used: each process would
rotate on its own idea of the size, renaming files the others still write to.

Cost, in server CPU per cached hit (about 95 µs without the log; two servers
side by side under ``benchmarks/_loadgen.py``): a ``stat`` and a ``write`` per
line, a scan of the result for its summary and a record encoded per line made
the log cost 21 µs a hit. With one ``stat`` and one ``write`` per turn, one
time per turn, and a hit's line remembered but for its time
(:data:`_remembered_fields`), it costs 5 µs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
from msgspec import UNSET, Struct, UnsetType

from runcache.engine.callers import Caller
from runcache.errors import ConfigError
from runcache.logs import loggable

if TYPE_CHECKING:
    from runcache.engine.engine import Outcome
    from runcache.engine.jobs import Job

log = logging.getLogger(__name__)

#: Rotated files kept beside the live one: ``PATH.1`` (newest) to ``PATH.5``.
KEPT_FILES = 5

#: The last whole second, and the format of a time within it (``…T03:14:55.%06dZ``):
#: a line's time costs a fifth as much as formatting it whole (0.5 µs against 2.3).
_second_format: tuple[int, bytes] = (-1, b"")


def utc_now() -> bytes:
    """Now in ISO 8601, UTC, to the microsecond: ``2026-11-29T03:14:55.123456Z``."""
    global _second_format
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if second != _second_format[0]:
        text = time.strftime("%Y-%m-%dT%H:%M:%S.%%06dZ", time.gmtime(second))
        _second_format = (second, text.encode())
    return _second_format[1] % micros


class AuditRecord(Struct, kw_only=True):
    """What every line holds after its ``time`` (written first, by :meth:`AuditLog.flush`)."""

    action: str
    client: str
    credential: str
    identity: str


class CommandRecord(AuditRecord, kw_only=True):
    """A command request: a hit (``cached``), a share of an identical run (``coalesced``),
    or a run. ``return_code``, ``execution_time`` and ``output_bytes`` (stdout and stderr,
    UTF-8 bytes of the result) are null when there was no result: ``error`` says why."""

    command: str
    #: Null for a request refused before it had one.
    cache_key: str | None
    cached: bool
    coalesced: bool
    stale: bool
    background: bool
    return_code: int | None
    execution_time: float | None
    output_bytes: int | None
    job_id: str | UnsetType = UNSET
    error: str | UnsetType = UNSET


class RemovalRecord(AuditRecord, kw_only=True):
    """A clear, an entry's delete or an invalidation, and how many entries went
    (a clear does not count them: null)."""

    deleted: int | None
    cache_key: str | UnsetType = UNSET
    prefix: str | UnsetType = UNSET
    glob: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET


_encoder = msgspec.json.Encoder()


def _fields(record: AuditRecord) -> bytes:
    """A line of the log without its start, ``{"time":"…",`` (see :meth:`AuditLog.flush`)."""
    return _encoder.encode(record)[1:] + b"\n"


def _command_fields(
    caller: Caller,
    command: str,
    cache_key: str | None,
    body: bytes | None,
    cached: bool,
    coalesced: bool,
    stale: bool,
    background: bool = False,
    job_id: str | UnsetType = UNSET,
    error: str | UnsetType = UNSET,
) -> bytes:
    """The one place a command's record is made (as :func:`_fields`); the command, and an
    error that may quote it, are cut as every log cuts them (:func:`runcache.logs.loggable`)."""
    summary = result_summary(body) if body is not None else None
    return _fields(
        CommandRecord(
            action="command",
            client=caller.client,
            credential=caller.credential,
            identity=caller.identity,
            command=loggable(command),
            cache_key=cache_key,
            cached=cached,
            coalesced=coalesced,
            stale=stale,
            background=background,
            return_code=summary[0] if summary else None,
            execution_time=summary[1] if summary else None,
            output_bytes=summary[2] if summary else None,
            job_id=job_id,
            error=error if isinstance(error, UnsetType) else loggable(error),
        )
    )


#: Hits repeat a request and its answer, so their lines differ in time alone: the
#: fields of the last 256 answers with small results are kept, by what makes them
#: (a result by its bytes: the memory store's hit is the same object each time,
#: its hash already known). An answer's own work is then a lookup.
_remembered_fields = functools.lru_cache(maxsize=256)(_command_fields)

#: Results up to this size have their answers' fields remembered (at most 4 MiB
#: of results kept alive by :data:`_remembered_fields`).
REMEMBERED_BODY_BYTES = 16 * 1024


class AuditLog:
    """Appends records to ``path`` (nothing at all when ``path`` is empty)."""

    def __init__(self, path: str = "", max_bytes: int = 10 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd = -1
        self._lock_fd = -1
        self._identity = (0, 0)
        #: Lines of this turn of the event loop (as :func:`_fields`), written at its end.
        self._pending: list[bytes] = []
        if path:
            try:
                self._lock_fd = os.open(
                    path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                self._open()
            except OSError as error:
                self.close()
                raise ConfigError(f"{path!r} cannot be opened: {error.strerror or error}") from None

    @property
    def enabled(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        self.flush()
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    # -- the records -------------------------------------------------------------------

    def answered(self, caller: Caller, command: str, cache_key: str, outcome: Outcome) -> None:
        """A foreground request's answer."""
        if self._fd >= 0:
            body = outcome.body
            fields = _remembered_fields if len(body) <= REMEMBERED_BODY_BYTES else _command_fields
            self._add(
                fields(
                    caller,
                    command,
                    cache_key,
                    body,
                    outcome.cached,
                    outcome.coalesced,
                    outcome.stale,
                )
            )

    def left(self, caller: Caller, command: str, cache_key: str) -> None:
        """A foreground request whose client hung up before its answer."""
        if self._fd >= 0:
            self._add(
                _command_fields(
                    caller,
                    command,
                    cache_key,
                    None,
                    False,
                    False,
                    False,
                    error="the client closed the connection before the answer",
                )
            )

    def refused(self, caller: Caller, command: str, error: str) -> None:
        """A request refused with an error (by the allowlist, a bound, a full queue)."""
        if self._fd >= 0:
            self._add(
                _command_fields(caller, command, None, None, False, False, False, error=error)
            )

    def submitted(self, caller: Caller, job: Job, joined: bool) -> None:
        """A background request: its line is written when its job ends (at once for one
        answered from the cache), with the result's summary."""
        if self._fd < 0:
            return
        if job.ended or job.task is None:
            self._job_ended(caller, job, joined)
        else:
            job.task.add_done_callback(lambda _: self._job_ended(caller, job, joined))

    def _job_ended(self, caller: Caller, job: Job, joined: bool) -> None:
        self._add(
            _command_fields(
                caller,
                job.command,
                job.cache_key,
                job.body,
                job.cached,
                joined or job.elsewhere,
                job.stale,
                background=True,
                job_id=job.job_id,
                error=job.error if job.error is not None else UNSET,
            )
        )

    def removed(self, caller: Caller, action: str, deleted: int | None, **what: str) -> None:
        """A ``clear``, a ``delete`` (``cache_key=``) or an ``invalidate`` (``prefix=`` or
        ``glob=``, and ``scope=``)."""
        if self._fd >= 0:
            self._add(
                _fields(
                    RemovalRecord(
                        action=action,
                        client=caller.client,
                        credential=caller.credential,
                        identity=caller.identity,
                        deleted=deleted,
                        **what,
                    )
                )
            )

    # -- the file ----------------------------------------------------------------------

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        found = os.fstat(fd)
        self._identity = (found.st_dev, found.st_ino)

    def _add(self, fields: bytes) -> None:
        """Keep a line for the end of this turn of the event loop; outside a loop
        (a test, a tool), write it now."""
        self._pending.append(fields)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Append the lines kept so far with one ``write()``, each starting with the time
        now: the time a line was written, at most a turn of the loop after its answer."""
        if not self._pending:
            return
        start = b'{"time":"%s",' % utc_now()
        lines = start + start.join(self._pending)
        self._pending.clear()
        if self._fd < 0:
            return
        try:
            self._check(len(lines))
            os.write(self._fd, lines)
        except OSError as error:  # a full disk must not fail the request: say so, go on
            log.error("audit log %s: cannot write: %s", self.path, error.strerror or error)

    def _check(self, needed: int) -> None:
        """Look at the file: rotate it if ``needed`` more bytes would take it past
        ``max_bytes``, reopen it if it is no longer the file this process writes to."""
        try:
            found = os.stat(self.path)
            current = (found.st_dev, found.st_ino) == self._identity
            full = 0 < found.st_size and found.st_size + needed > self.max_bytes
        except FileNotFoundError:  # removed by hand, or mid-rotation
            current, full = False, False
        if full or not current:
            self._rotate(needed)

    def _rotate(self, needed: int) -> None:
        """Under the lock: rotate ``path`` if it is still full (another process may have
        rotated it meanwhile), then write to whatever file ``path`` is now."""
        with self._locked():
            try:
                found = os.stat(self.path)
            except FileNotFoundError:
                found = None
            if (
                found is not None
                and 0 < found.st_size
                and (found.st_size + needed > self.max_bytes)
            ):
                for number in range(KEPT_FILES - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}.{number}", f"{self.path}.{number + 1}")
                os.replace(self.path, self.path + ".1")
            self._open()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


# -- a result's summary, read without decoding its output ------------------------------

#: Where the output starts and where stderr starts in a stored result
#: (:func:`runcache.run.encode.encode_result` writes the summary, then stdout, then stderr).
_STDOUT = b',"stdout":"'
_STDERR = b'","stderr":"'


class _Summary(Struct):
    """The part of a stored result (:class:`runcache.wire.RunSummary`) a record holds."""

    return_code: int
    execution_time: float


class _Whole(_Summary):
    stdout: str
    stderr: str


def result_summary(body: bytes) -> tuple[int, float, int]:
    """A stored result's return code, execution time and output size (UTF-8 bytes of
    stdout and stderr), without decoding megabytes of output on a hit.

    Inside a JSON string every ``"`` is escaped, so ``","stderr":"`` (its first quote
    unescaped) can only be the seam between the two streams. A stream's size is its
    escaped length less what its escapes add: one byte each (``\\n``, ``\\"``, ``\\\\``...);
    a ``\\u`` escape (a control character) is rarer and longer, so a stream that may
    hold one is decoded to count it.
    """
    start = body.find(_STDOUT)
    seam = body.rfind(_STDERR)
    if start < 0 or seam < start or not body.endswith(b'"}'):
        result = msgspec.json.decode(body, type=_Whole)
        size = len(result.stdout.encode()) + len(result.stderr.encode())
        return result.return_code, result.execution_time, size
    summary = msgspec.json.decode(body[:start] + b"}", type=_Summary)
    size = _text_bytes(body, start + len(_STDOUT), seam) + _text_bytes(
        body, seam + len(_STDERR), len(body) - 2
    )
    return summary.return_code, summary.execution_time, size


def _text_bytes(body: bytes, start: int, end: int) -> int:
    """UTF-8 bytes of the text the JSON string ``body[start:end]`` (between its quotes)
    holds. Every escape starts with a backslash; ``\\\\`` has two of them."""
    backslashes = body.count(b"\\", start, end)
    if not backslashes:
        return end - start
    if body.find(b"\\u", start, end) >= 0:
        return len(msgspec.json.decode(body[start - 1 : end + 1], type=str).encode())
    return end - start - backslashes + body.count(b"\\\\", start, end)
