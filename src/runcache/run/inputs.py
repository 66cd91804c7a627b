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

#: At most this many plain paths are looked at on the event loop (see Inputs.few_paths).
FEW_PATHS = 32

#: A file's stat as the cheap check sees it: size, mtime in ns, inode, device.
Stat = tuple[int, int, int, int]

#: Snapshots of plain paths kept whole (see Inputs.known): this many (cwd, paths) pairs.
KNOWN_SNAPSHOTS = 256


def _not_plain(pattern: str) -> bool:
    """Whether ``pattern`` is a glob (what ``glob.has_magic`` finds: ``*``, ``?`` or ``[``,
    looked for here without its regular expression, on every hit) or ``git:``."""
    return "*" in pattern or "?" in pattern or "[" in pattern or pattern == GIT


class NeedsRead(Exception):
    """A snapshot asked for without reading found a file it must read."""


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
        #: Each path looked at (as joined to its directory): its lstat and real path when
        #: last checked, so an unchanged regular file is not resolved and checked again.
        self._seen: dict[str, tuple[Stat, str]] = {}
        self._memo_size = memo_size or 4 * max_files
        #: Snapshots of a few plain paths, by (cwd, paths), with the lstat of each path
        #: (as joined to cwd) they were taken on: see :meth:`known`.
        self._snapshots: OrderedDict[
            tuple[str, tuple[str, ...]], tuple[tuple[str, ...], tuple[Stat, ...], Snapshot]
        ] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def few_paths(patterns: Sequence[str]) -> bool:
        """Whether ``patterns`` are a few plain paths (no glob, no git): their snapshot is
        a few ``lstat`` calls (and a read of a file seen changed), which the event loop
        can afford where a hop to a thread costs more."""
        return len(patterns) <= FEW_PATHS and not any(map(_not_plain, patterns))

    def snapshot(self, cwd: str, patterns: Sequence[str], known_only: bool = False) -> Snapshot:
        """The inputs ``patterns`` name at ``cwd`` now; BadRequest says what is wrong.
        ``known_only``: raise :class:`NeedsRead` rather than read a file (the caller, on
        the event loop, then asks again from a thread)."""
        known = self.known(cwd, patterns)
        if known is not None:
            return known
        files = self._files(cwd, patterns)
        budget = [self.max_bytes]
        digest = hashlib.blake2b(digest_size=32)
        for name, path, file_stat in files:
            file_digest = self._digest(path, file_stat, budget, known_only)
            digest.update(name.encode() + b"\0" + file_digest)
        git = describe_git(cwd) if GIT in patterns else b""
        digest.update(b"\0git\0" + git)
        snapshot = Snapshot(digest.digest(), tuple((path, found) for _, path, found in files), git)
        self._remember(cwd, patterns, files, snapshot)
        return snapshot

    def known(self, cwd: str, patterns: Sequence[str]) -> Snapshot | None:
        """The snapshot taken last time of the same plain paths at ``cwd``, if each path's
        ``lstat`` is the same as then: one ``lstat`` a path and nothing else, where the
        full pass resolves the directory, checks each pattern, joins and normalizes each
        path, looks each digest up and combines them again (a hit's inputs, unchanged,
        cost it three times the ``lstat`` calls). Only remembered for paths that were
        each a regular file, not a link (:meth:`_remember`), so an unchanged ``lstat``
        means the same file with the same content, as the digest memo takes it."""
        with self._lock:
            found = self._snapshots.get((cwd, tuple(patterns)))
        if found is None:
            return None
        fulls, before, snapshot = found
        try:
            now = [
                (at.st_size, at.st_mtime_ns, at.st_ino, at.st_dev) for at in map(os.lstat, fulls)
            ]
        except OSError:
            return None
        return snapshot if tuple(now) == before else None

    def _remember(
        self,
        cwd: str,
        patterns: Sequence[str],
        files: list[tuple[str, str, Stat]],
        snapshot: Snapshot,
    ) -> None:
        """Keep ``snapshot`` for :meth:`known` when ``patterns`` are plain paths, each one
        a regular file found as named (no glob, no git, no link, none missing, none
        absolute: then the full pass must look again, since what a pattern names, or
        whether it is allowed, may change another way)."""
        if len(files) != len(patterns) or not self.few_paths(patterns):
            return
        if any(os.path.isabs(pattern) for pattern in patterns):
            return
        fulls = tuple(os.path.join(cwd, name) for name, _, _ in files)
        for full, (_, real, file_stat) in zip(fulls, files, strict=True):
            if self._seen.get(full) != (file_stat, real):  # a link, or not seen as a file
                return
        stats = tuple(file_stat for _, _, file_stat in files)
        with self._lock:
            self._snapshots[(cwd, tuple(patterns))] = (fulls, stats, snapshot)
            self._snapshots.move_to_end((cwd, tuple(patterns)))
            while len(self._snapshots) > KNOWN_SNAPSHOTS:
                self._snapshots.popitem(last=False)

    def changed(self, cwd: str, patterns: Sequence[str], before: Snapshot) -> bool:
        """Whether the inputs differ from ``before`` (a file added, gone or touched, or the
        repository moved): the stat pass and git again, no file read."""
        try:
            now = tuple((path, found) for _, path, found in self._files(cwd, patterns))
        except (BadRequest, OSError):
            return True
        if now != before.stats:
            return True
        return GIT in patterns and describe_git(cwd) != before.git

    def _files(self, cwd: str, patterns: Sequence[str]) -> list[tuple[str, str, Stat]]:
        """The files the patterns match, each as (name relative to ``cwd``, real path,
        stat), sorted and unique; at most ``max_files``. One ``lstat`` a file, and a
        ``realpath`` for each directory they are in (and each link), not each file."""
        found: dict[str, tuple[str, Stat]] = {}
        directories: dict[str, str] = {}
        real_cwd = os.path.realpath(cwd)
        for pattern in patterns:
            if pattern == GIT:
                continue
            self._check_pattern(real_cwd, pattern)
            matches = (
                glob.iglob(pattern, root_dir=cwd, recursive=True)
                if glob.has_magic(pattern)
                else [pattern]
            )
            for match in matches:
                name = os.path.normpath(match)
                if name in found:
                    continue
                entry = self._entry(cwd, real_cwd, match, directories)
                if entry is None:
                    continue
                found[name] = entry
                if len(found) > self.max_files:
                    raise BadRequest(
                        f"inputs match more than {self.max_files} files (--max-input-files)"
                    )
        return [(name, *found[name]) for name in sorted(found)]

    def _entry(
        self, cwd: str, real_cwd: str, match: str, directories: dict[str, str]
    ) -> tuple[str, Stat] | None:
        """A match's real path and stat, if it is a regular file (None if it is not, or
        not there); BadRequest if it leads outside the allowed directories."""
        full = os.path.join(cwd, match)
        try:
            found = os.lstat(full)
        except OSError:
            return None
        file_stat = (found.st_size, found.st_mtime_ns, found.st_ino, found.st_dev)
        seen = self._seen.get(full)
        if seen is not None and seen[0] == file_stat:  # the same file as last time: checked
            return seen[1], file_stat
        if stat.S_ISLNK(found.st_mode):
            real = os.path.realpath(full)
            try:
                found = os.stat(real)
            except OSError:
                return None
        else:
            parent, base = os.path.split(full)
            if parent not in directories:
                directories[parent] = os.path.realpath(parent)
            real = os.path.join(directories[parent], base)
        if not stat.S_ISREG(found.st_mode):
            return None
        if not self._allowed(real_cwd, real):
            raise BadRequest(f"input {match!r} leads outside the run's directory (through a link)")
        resolved = (found.st_size, found.st_mtime_ns, found.st_ino, found.st_dev)
        if resolved == file_stat:  # a regular file, not a link: its lstat says it is the same
            with self._lock:
                self._seen[full] = (file_stat, real)
                while len(self._seen) > self._memo_size:
                    del self._seen[next(iter(self._seen))]
        return real, resolved

    def _check_pattern(self, real_cwd: str, pattern: str) -> None:
        if ".." in pattern and ".." in pattern.replace("\\", "/").split("/"):
            raise BadRequest(f"input {pattern!r} may not leave the run's directory (..)")
        if os.path.isabs(pattern) and not self._allowed(real_cwd, os.path.realpath(pattern)):
            raise BadRequest(f"input {pattern!r} is outside the run's directory and --allow-cwd")

    def _allowed(self, real_cwd: str, real: str) -> bool:
        return any(within(real, root) for root in (real_cwd, *self.roots))

    def _digest(self, path: str, file_stat: Stat, budget: list[int], known_only: bool) -> bytes:
        """The file's content digest: the memo's while its stat is unchanged, else read."""
        with self._lock:
            known = self._memo.get(path)
            if known is not None and known[0] == file_stat:
                self._memo.move_to_end(path)
                return known[1]
        if known_only:
            raise NeedsRead(path)
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
