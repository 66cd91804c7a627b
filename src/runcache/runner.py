"""Running one command: its own process group, a deadline, and capped output.

A command runs as the leader of a new process group so that a timeout, or the
server shutting down, can kill it together with everything it spawned. Output is
read from both pipes by one selector loop in the calling thread (no helper
threads per run); past the cap, output is still drained so the command never
blocks on a full pipe, but it is not kept.
"""

from __future__ import annotations

import fcntl
import os
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

#: How long to keep reading after the command itself exited, for output still
#: held by processes it left behind; then the rest of its group is killed.
EXIT_GRACE_SECONDS = 1.0

#: How long to keep reading after a timeout killed the group, for output
#: already written into the pipes.
KILL_DRAIN_SECONDS = 0.5

#: How often the read loop wakes to check whether the command has exited.
_POLL_SECONDS = 0.1

_READ_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True)
class RunResult:
    """What one run of a command produced.

    The output stays raw bytes: :func:`runcache.results.encode_result` decodes
    and encodes it a slice at a time, so a large output is never held as both
    bytes and text at once.
    """

    stdout: bytearray
    stderr: bytearray
    return_code: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    execution_time: float
    timestamp: str

    @property
    def success(self) -> bool:
        return self.return_code == 0 and not self.timed_out

    @property
    def partial_results(self) -> bool:
        return self.timed_out and bool(self.stdout or self.stderr)


class _Capture:
    """The bytes kept from one pipe, up to a cap."""

    def __init__(self, cap: int) -> None:
        self.data = bytearray()
        self.cap = cap
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:room]
        self.data += chunk


class Runner:
    """Runs commands and remembers which are running, so shutdown can kill them all."""

    def __init__(
        self,
        max_output_bytes: int,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.max_output_bytes = max_output_bytes
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """How many commands are running now."""
        return len(self._running)

    def run(self, argv: Sequence[str], timeout: float) -> RunResult:
        """Run ``argv`` until it exits or ``timeout`` seconds pass, whichever is first."""
        timestamp = datetime.now(timezone.utc).isoformat()
        started = time.monotonic()
        try:
            proc = self._start(argv)
        except OSError as error:
            message = f"runcache: cannot run {argv[0]!r}: {error.strerror or error}\n"
            return RunResult(bytearray(), bytearray(message.encode()), 127, False, False, False,
                             0.0, timestamp)
        try:
            stdout, stderr, timed_out = self._collect(proc, started + timeout)
        finally:
            self._finish(proc)
        return RunResult(
            stdout=stdout.data,
            stderr=stderr.data,
            return_code=proc.returncode,
            timed_out=timed_out,
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
            execution_time=time.monotonic() - started,
            timestamp=timestamp,
        )

    def _start(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._closed:
                raise OSError("runcache is shutting down")
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
            )
            self._running.add(proc.pid)
        for pipe in (proc.stdout, proc.stderr):
            _widen_pipe(pipe)
        return proc

    def _collect(
        self, proc: subprocess.Popen[bytes], deadline: float
    ) -> tuple[_Capture, _Capture, bool]:
        """Read both pipes until they close, the deadline passes, or the exit grace ends."""
        assert proc.stdout is not None and proc.stderr is not None
        captures = (_Capture(self.max_output_bytes), _Capture(self.max_output_bytes))
        with selectors.DefaultSelector() as selector, _ExitWatch(proc.pid) as exit_watch:
            selector.register(proc.stdout, selectors.EVENT_READ, captures[0])
            selector.register(proc.stderr, selectors.EVENT_READ, captures[1])
            exit_watch.register(selector)
            timed_out = _read_until_closed(selector, exit_watch, deadline)
            if not timed_out and not _pipes_open(selector):
                # Both pipes closed, but the command itself may still be running.
                timed_out = not exit_watch.wait(deadline)
            if timed_out or _pipes_open(selector):
                _kill_group(proc.pid)
                drain_until = time.monotonic() + KILL_DRAIN_SECONDS
                while _pipes_open(selector) and time.monotonic() < drain_until:
                    _read_ready(selector, _POLL_SECONDS)
        return captures[0], captures[1], timed_out

    def _finish(self, proc: subprocess.Popen[bytes]) -> None:
        # Kill whatever the command left in its group while the leader's pid is
        # still unreaped, so the group id cannot have been reused yet.
        if not _exited(proc.pid):
            _kill_group(proc.pid)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(proc.pid)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        with self._lock:
            self._running.discard(proc.pid)

    def kill_all(self) -> None:
        """Kill every running command's process group and refuse new runs."""
        with self._lock:
            self._closed = True
            groups = list(self._running)
        for pgid in groups:
            _kill_group(pgid)


class _ExitWatch:
    """Learns that a process exited without reaping it, so its group id stays reserved.

    A pidfd (Linux 5.3+) becomes readable when the process exits, so a run
    sleeps until output, exit or deadline instead of waking to poll; where there
    is none, the read loop polls every ``_POLL_SECONDS``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.fd = None

    def register(self, selector: selectors.BaseSelector) -> None:
        if self.fd is not None:
            selector.register(self.fd, selectors.EVENT_READ, None)

    def armed(self, selector: selectors.BaseSelector) -> bool:
        """Whether the selector will wake when the process exits."""
        return self.fd is not None and self.fd in selector.get_map()

    def wait(self, deadline: float) -> bool:
        """Wait until the process exits; False if the deadline comes first."""
        while not _exited(self.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.fd is not None:
                select.select([self.fd], [], [], remaining)
            else:
                time.sleep(min(_POLL_SECONDS, remaining))
        return True

    def __enter__(self) -> _ExitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _read_until_closed(
    selector: selectors.BaseSelector, exit_watch: _ExitWatch, deadline: float
) -> bool:
    """Read until both pipes close or the exit grace ends; True if the deadline came first."""
    pid = exit_watch.pid
    exited_at: float | None = None
    while _pipes_open(selector):
        now = time.monotonic()
        if now >= deadline:
            return not _exited(pid)
        if exited_at is None and _exited(pid):
            exited_at = now
        if exited_at is not None and now - exited_at >= EXIT_GRACE_SECONDS:
            return False
        # While a pidfd watches for the exit, nothing needs a periodic wake-up.
        watched = exited_at is None and exit_watch.armed(selector)
        _read_ready(selector, deadline - now if watched else min(deadline - now, _POLL_SECONDS))
    return False


def _pipes_open(selector: selectors.BaseSelector) -> bool:
    return any(key.data is not None for key in selector.get_map().values())


def _read_ready(selector: selectors.BaseSelector, timeout: float) -> None:
    for key, _ in selector.select(timeout):
        if key.data is None:  # the exit watch: the command has exited
            selector.unregister(key.fileobj)
            continue
        chunk = os.read(key.fd, _READ_SIZE)
        if chunk:
            key.data.add(chunk)
        else:
            selector.unregister(key.fileobj)


def _exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it."""
    status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return status is not None and status.si_pid == pid


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _widen_pipe(pipe: object) -> None:
    # Larger pipe buffers mean fewer wake-ups for commands with a lot of output.
    try:
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _READ_SIZE)  # type: ignore[attr-defined]
    except OSError:
        pass
