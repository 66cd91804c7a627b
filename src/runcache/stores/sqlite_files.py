"""The files under a SQLite store, and what happens to them behind runcache's back.

A connection holds its database file open, so a file deleted or replaced (renamed
over) while runcache runs goes on being used by it, unseen: the running servers
keep serving the old file, a server started on the path serves a new one, and a
clear no longer reaches both. So before each call the store compares the file at
its path with the one its connection opened (:func:`identity`, one ``stat``) and
reopens the path when they differ.

In WAL mode each connection also maps the ``-shm`` file (the WAL index) into
memory. A ``-shm`` truncated while mapped kills the process with SIGBUS at the
next touch of the mapping, a read, a write or even a close; SQLite cannot catch
that, and no setting of it avoids the mapping short of giving up sharing the file
between processes (``locking_mode = EXCLUSIVE``). What runcache can do is look
before it touches: a ``-shm`` shorter than the one region every connection maps
is a mapping that would fault, and the connections on it are never used again
(:func:`abandon`). A ``-wal`` or ``-shm`` that is not a regular file runcache can
write is refused before SQLite opens it (:func:`check_companions`), with a message
that names it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sqlite3
import stat
from pathlib import Path

#: Bytes of the ``-shm`` file a connection maps from its first statement on: one
#: region of the WAL index. While a connection is open it is never shorter, unless
#: something truncated it under the mapping.
SHM_REGION = 32 * 1024

#: A file as the kernel knows it: its device and inode numbers.
Identity = tuple[int, int]


def identity(path: Path) -> Identity:
    """The file at ``path`` now; raises FileNotFoundError when there is none."""
    found = os.stat(path)
    return found.st_dev, found.st_ino


def companion(path: Path, suffix: str) -> Path:
    """SQLite's ``-wal`` or ``-shm`` file of the database at ``path``."""
    return path.with_name(path.name + suffix)


def changed(path: str, shm: str, opened: Identity) -> str | None:
    """How the database at ``path`` and its ``-shm`` at ``shm`` differ from those a
    connection opened as ``opened``, if they do: deleted, replaced, or a ``-shm`` that would
    fault (see :data:`SHM_REGION`). On every call of the store: two ``stat`` calls, on
    names given as strings (a Path would cost more than the calls)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return "was deleted"
    if (found.st_dev, found.st_ino) != opened:
        return "was replaced"
    try:
        size = os.stat(shm).st_size
    except FileNotFoundError:
        return "lost its -shm file"
    if size < SHM_REGION:
        return TRUNCATED
    return None


#: What :func:`changed` says of a ``-shm`` truncated under the connection's mapping.
TRUNCATED = "had its -shm file truncated while mapped"


def check_companions(path: Path) -> None:
    """Refuse, naming it, a ``-wal`` or ``-shm`` that SQLite could not use as its own: one
    that is not a regular file (a directory, a FIFO, a device) or cannot be opened for
    writing (read-only to this user, immutable). Raises sqlite3.OperationalError."""
    for suffix in ("-wal", "-shm"):
        name = companion(path, suffix)
        try:
            mode = os.stat(name).st_mode
        except FileNotFoundError:
            continue  # SQLite makes it
        except OSError as error:
            raise sqlite3.OperationalError(f"cannot use {name}: {error.strerror}") from error
        if not stat.S_ISREG(mode):
            raise sqlite3.OperationalError(
                f"{name} is not a regular file: remove it (with every runcache on this "
                "file stopped)"
            )
        # access(), not open(): closing any descriptor of a file drops every POSIX lock
        # this process holds on it, and SQLite's locks on the -shm are what keep another
        # process from truncating it under this one's mapping (SIGBUS).
        if not os.access(name, os.R_OK | os.W_OK):
            reason = "read-only or immutable to this user"
            raise sqlite3.OperationalError(
                f"{name} cannot be written ({reason}): SQLite must write it"
            )


def abandon(connection: sqlite3.Connection) -> None:
    """Never use, close nor free ``connection`` again: its ``-shm`` mapping would fault.

    Freeing a connection closes it, and closing reads the mapping (to checkpoint), so
    the connection gets a reference that is never given back; it costs one open file
    and one mapping until the process ends.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(connection))


def create_private(path: str | os.PathLike[str]) -> None:
    """Create the database file readable by runcache's user alone, if it is not there
    (SQLite would make it 0644 less the umask, and its -wal and -shm take the database's
    mode): a run as --run-as cannot read it. Whoever opens the file first (the cache or
    the job board) must call this before SQLite creates it; it makes the file's directory
    too, so whichever of the two comes first finds it."""
    with contextlib.suppress(OSError):  # SQLite says what is wrong when it opens the file
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # there already, or SQLite will say what is wrong
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
