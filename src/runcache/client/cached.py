"""``runcache run``'s light hit path: a fresh cached answer, with almost nothing imported.

A cached ``runcache run`` used to cost half a second, nearly all of it imports
(click, the engine, the stores, msgspec, starlette through them) for an answer
that is one SQLite row. Here, before any of that, the simplest and commonest
case is answered from the user's SQLite file with the standard library only:
no server (no ``RUNCACHE_*`` variable but ``RUNCACHE_STORE``, naming a SQLite
file if set), no option but ``--cache-exit-codes``, no context and no inputs,
and a result that has not expired. The key is :func:`runcache.keys.cache_key`,
the engine's own, with the engine's defaults. The hit is counted as the store
counts one (the entry's hits and recency, the namespace's hits) in one
transaction, and the output is written as the full path writes a cached
result's: the stored text's UTF-8, each stream to its own, then the exit code.

Anything else returns None before a byte is written, and ``runcache run``
takes its full path, which decides as it always did: a miss, an expired or
stale entry, ``--refresh``, ``--warm``, inputs, a context, a server, a setting
from the environment, a file that is locked or not there. So this only ever
answers what the full path would, only sooner.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence

from runcache.client import STORE_ENV, local_store
from runcache.keys import (
    DEFAULT_EXIT_CODES,
    DEFAULT_MAX_OUTPUT_BYTES,
    SHELL,
    cache_key,
    command_text,
    key_context,
)

#: typing.TYPE_CHECKING, without importing typing (milliseconds this path saves).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

#: The store's namespace when its URL names none (stores.DEFAULT_NAMESPACE); a URL
#: naming one takes the full path.
NAMESPACE = "runcache"

#: Seconds the hit may wait for another process's write before leaving it to the full
#: path, which waits as the store's settings say.
BUSY_SECONDS = 0.5

#: The one option understood here; any other one takes the full path.
_CODES = "--cache-exit-codes"

#: The hit, as :meth:`runcache.stores.sqlite.SqliteStore.get_stale` makes one with no
#: stale accepted: find, check expiry and touch the entry in one statement.
_HIT = (
    "UPDATE entries SET used = (SELECT used + 1 FROM counts WHERE namespace = ?),"
    " hits = hits + 1 WHERE namespace = ? AND key = ? AND expires_at > ?"
    " RETURNING id"
)
_COUNT = "UPDATE counts SET hits = hits + 1, used = used + 1 WHERE namespace = ?"
_VALUE = 'SELECT value FROM "values" WHERE id = ?'

#: What the full path prints when a stream was cut at the output cap (cli.run).
_CUT = "runcache: {} was cut at the output cap\n"


def answer(args: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Answer ``runcache <args>`` from the cache and end the process with the command's
    exit code; or return, having written nothing, when the full path must answer.

    The process ends with ``os._exit`` once the output is flushed: the interpreter's
    teardown would close the SQLite connection (see :func:`_hit`) and costs a few
    milliseconds of its own, with nothing left to do.
    """
    environ = os.environ if environ is None else environ
    request = _request(args, environ)
    if request is None:
        return None
    command, codes, path = request
    try:
        prefix = key_context(SHELL, os.getcwd(), environ, DEFAULT_MAX_OUTPUT_BYTES)
        found = _hit(path, cache_key(prefix, command, b"", codes))
        if found is None:
            return None
        body, db = found  # held open until the answer is written (see _hit)
        result = json.loads(body)
        if result.get("timed_out") or result.get("cancelled"):
            return None  # never stored as answers; the full path says what such a result is
        stdout = result["stdout"].encode()
        stderr = result["stderr"].encode()
        code = int(result["return_code"])
    except (OSError, ValueError, KeyError, TypeError, sqlite3.Error):
        return None
    for name in ("stdout", "stderr"):
        if result.get(f"{name}_truncated"):
            stderr += _CUT.format(name).encode()
    try:
        _write_all(sys.stdout.buffer, stdout)
        _write_all(sys.stderr.buffer, stderr)
    except BrokenPipeError:  # the reader left (| head): as click ends the full path
        os._exit(1)
    os._exit(128 - code if code < 0 else code)  # db is still open here, on purpose


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write all of ``data``: a write to a pipe whose reader is leaving (or one a signal
    interrupts) may take only part of it and say so, rather than raise."""
    view = memoryview(data)
    while view:
        view = view[stream.write(view) :]
    stream.flush()


def _request(
    args: Sequence[str], environ: Mapping[str, str]
) -> tuple[str, frozenset[int], str] | None:
    """The command text, exit codes and SQLite file of a ``run`` this path can answer."""
    if len(args) < 2 or args[0] != "run" or sys.stdout is None or sys.stderr is None:
        return None
    if any(name.startswith("RUNCACHE_") and name != STORE_ENV for name in environ):
        return None  # a server, or a setting that may change the key or the answer
    url = local_store(environ)
    path = url.removeprefix("sqlite://")
    if path == url or not path.startswith("/") or "?" in path or "#" in path:
        return None
    codes: frozenset[int] = DEFAULT_EXIT_CODES
    rest = list(args[1:])
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option == "--":
            break
        name, equals, value = option.partition("=")
        if name != _CODES or not (equals or rest):
            return None
        try:
            codes = frozenset(int(code) for code in (value if equals else rest.pop(0)).split(","))
        except ValueError:
            return None  # the full path says what is wrong with it
    if not rest:
        return None
    return command_text(rest), codes, path


def _hit(path: str, key: str) -> tuple[bytes, sqlite3.Connection] | None:
    """The value of a live entry ``key`` in the SQLite file at ``path``, counted as a hit,
    and the connection; None (nothing changed) when there is none or the file is not there.

    The connection is handed back open, not closed: closing the last one of a WAL
    database checkpoints it, fsyncs included, which costs a hit more than the rest of
    its SQL. :func:`answer` exits without closing it (``os._exit``): the commit is
    durable in the WAL, which the store's next writer checkpoints in its turn. As the
    store's own connections, ``synchronous = NORMAL``: a commit does not fsync either.
    """
    quoted = path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    db = sqlite3.connect(
        f"file:{quoted}?mode=rw", uri=True, timeout=BUSY_SECONDS, isolation_level=None
    )
    try:
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        found = db.execute(_HIT, (NAMESPACE, NAMESPACE, key, time.time())).fetchall()
        if not found:
            db.execute("ROLLBACK")
            db.close()
            return None
        db.execute(_COUNT, (NAMESPACE,))
        (value,) = db.execute(_VALUE, (found[0][0],)).fetchone()
        db.execute("COMMIT")
    except BaseException:
        db.close()
        raise
    return bytes(value), db
