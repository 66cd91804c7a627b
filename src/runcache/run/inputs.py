"""What a command reads, in its cache key: ``"inputs": ["src/**/*.py", "git:"]``.

A command's result depends on the files it reads, which its command line does not
show: ``pytest`` or ``cat notes.txt`` answer from the cache after the files changed.
A request that names its inputs (paths and globs relative to the run's directory,
and ``git:`` for the repository there) gets a key that changes when they do, as
build tools key an action on its inputs (Bazel on digests, bkt on modification
times). Both, here: each file's ``stat`` (size, mtime in ns, inode, device) is the
cheap check, and its content's BLAKE2b digest is computed only when the stat
changed since this server last saw it (a memo per server). A hit on unchanged
inputs costs their ``stat`` calls and no read.

Bounds: at most ``max_files`` files matched and ``max_bytes`` hashed per request
(``--max-input-files``, ``--max-input-bytes``), else a 400 naming the bound. A
pattern may not leave the run's directory (``..``, or an absolute path outside
it and outside ``--allow-cwd``), and a file found through a link that leads out
of it is refused too. :meth:`Inputs.changed` takes the stat pass again after
the run: a file changed meanwhile means the result is not stored, since its key
would not say what the command read.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from runcache.errors import BadRequest
from runcache.run.context import within

#: The input that keys on the git repository at the run's directory.
GIT = "git:"

#: Seconds git may take to describe a repository before the request is refused.
GIT_TIMEOUT = 10.0

#: A file's stat as the cheap check sees it: size, mtime in ns, inode, device.
Stat = tuple[int, int, int, int]


@dataclass(frozen=True)
class Snapshot:
    """What a request's inputs were when its key was made: the key's part, and what the
    check after the run compares (each file's stat, and the repository's description)."""

    digest: bytes
    stats: tuple[tuple[str, Stat], ...]
    git: bytes = b""


class Inputs:
    """The inputs of requests to one server, with the memo of file digests they share.

    Called in a worker thread (it reads the disk); the memo is guarded by a lock.
    """

    def __init__(
        self, max_files: int, max_bytes: int, roots: Sequence[str] = (), memo_size: int = 0
    ) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.roots = tuple(os.path.realpath(root) for root in roots)
        self._memo: OrderedDict[str, tuple[Stat, bytes]] = OrderedDict()
        self._memo_size = memo_size or 4 * max_files
        self._lock = threading.Lock()

    def snapshot(self, cwd: str, patterns: Sequence[str]) -> Snapshot:
        """The inputs ``patterns`` name at ``cwd`` now; BadRequest says what is wrong."""
        files = self._files(cwd, patterns)
        budget = [self.max_bytes]
        digest = hashlib.blake2b(digest_size=32)
        stats: list[tuple[str, Stat]] = []
        for name, path in files:
            file_stat = _stat_of(path)
            digest.update(name.encode() + b"\0" + self._digest(path, file_stat, budget))
            stats.append((path, file_stat))
        git = describe_git(cwd) if GIT in patterns else b""
        digest.update(b"\0git\0" + git)
        return Snapshot(digest.digest(), tuple(stats), git)

    def changed(self, cwd: str, patterns: Sequence[str], before: Snapshot) -> bool:
        """Whether the inputs differ from ``before`` (a file added, gone or touched, or the
        repository moved): the stat pass and git again, no file read."""
        try:
            now = tuple((path, _stat_of(path)) for _, path in self._files(cwd, patterns))
        except (BadRequest, OSError):
            return True
        if now != before.stats:
            return True
        return GIT in patterns and describe_git(cwd) != before.git

    def _files(self, cwd: str, patterns: Sequence[str]) -> list[tuple[str, str]]:
        """The files the patterns match, each as (name relative to ``cwd``, real path),
        sorted and unique; at most ``max_files``."""
        found: dict[str, str] = {}
        for pattern in patterns:
            if pattern == GIT:
                continue
            self._check_pattern(cwd, pattern)
            for match in glob.iglob(pattern, root_dir=cwd, recursive=True):
                full = os.path.join(cwd, match)
                if match in found or not os.path.isfile(full):
                    continue
                real = os.path.realpath(full)
                if not self._allowed(cwd, real):
                    raise BadRequest(
                        f"input {match!r} leads outside the run's directory (through a link)"
                    )
                found[os.path.normpath(match)] = real
                if len(found) > self.max_files:
                    raise BadRequest(
                        f"inputs match more than {self.max_files} files (--max-input-files)"
                    )
        return sorted(found.items())

    def _check_pattern(self, cwd: str, pattern: str) -> None:
        if ".." in pattern.replace("\\", "/").split("/"):
            raise BadRequest(f"input {pattern!r} may not leave the run's directory (..)")
        if os.path.isabs(pattern) and not self._allowed(cwd, os.path.realpath(pattern)):
            raise BadRequest(f"input {pattern!r} is outside the run's directory and --allow-cwd")

    def _allowed(self, cwd: str, real: str) -> bool:
        return any(within(real, root) for root in (os.path.realpath(cwd), *self.roots))

    def _digest(self, path: str, file_stat: Stat, budget: list[int]) -> bytes:
        """The file's content digest: the memo's while its stat is unchanged, else read."""
        with self._lock:
            known = self._memo.get(path)
            if known is not None and known[0] == file_stat:
                self._memo.move_to_end(path)
                return known[1]
        budget[0] -= file_stat[0]
        if budget[0] < 0:
            raise BadRequest(
                f"inputs need more than {self.max_bytes} bytes read (--max-input-bytes)"
            )
        try:
            with open(path, "rb") as file:
                digest = hashlib.file_digest(file, lambda: hashlib.blake2b(digest_size=32))
        except OSError as error:
            raise BadRequest(f"input {path!r} cannot be read: {error.strerror}") from None
        with self._lock:
            self._memo[path] = (file_stat, digest.digest())
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return digest.digest()


def _stat_of(path: str) -> Stat:
    try:
        found = os.stat(path)
    except OSError as error:
        raise BadRequest(f"input {path!r} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(found.st_mode):
        raise BadRequest(f"input {path!r} is not a regular file")
    return (found.st_size, found.st_mtime_ns, found.st_ino, found.st_dev)


def describe_git(cwd: str) -> bytes:
    """The repository at ``cwd`` as a key sees it: HEAD, what ``git status`` shows (ignored
    files excluded, untracked ones listed) and the diff of tracked files against HEAD, with
    the content of untracked files. BadRequest when ``cwd`` is in no repository."""
    head = _git(cwd, "rev-parse", "--verify", "-q", "HEAD", allow_fail=True)
    status = _git(cwd, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    diff = _git(cwd, "diff", "HEAD", "--binary") if head else _git(cwd, "diff", "--binary")
    digest = hashlib.blake2b(head + b"\0" + status + b"\0" + diff, digest_size=32)
    for entry in status.split(b"\0"):
        if entry.startswith(b"?? "):  # untracked: its content is in no diff
            path = os.path.join(cwd, os.fsdecode(entry[3:]))
            if os.path.isfile(path):
                with open(path, "rb") as file:
                    digest.update(hashlib.file_digest(file, "blake2b").digest())
    return digest.digest()


def _git(cwd: str, *args: str, allow_fail: bool = False) -> bytes:
    try:
        done = subprocess.run(
            ["git", "-C", cwd, *args],
            capture_output=True,
            timeout=GIT_TIMEOUT,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_OPTIONAL_LOCKS": "0"},
        )
    except FileNotFoundError:
        raise BadRequest('inputs "git:" needs git, which this server does not have') from None
    except subprocess.TimeoutExpired:
        raise BadRequest(f'inputs "git:": git took over {GIT_TIMEOUT:g} s at {cwd}') from None
    if done.returncode != 0 and not allow_fail:
        raise BadRequest(f'inputs "git:": {cwd} is not in a git repository')
    return done.stdout.strip() if done.returncode == 0 else b""
