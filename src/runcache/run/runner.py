"""Running one command: contained, with a deadline, limits and capped output.

A command runs as the leader of a new process group and, where runcache may
make one, as PID 1 of a PID namespace of its own (:mod:`runcache.run.containment`),
so that its end, a timeout, a cancel or the server stopping kills it together
with everything it spawned, wherever that went. Output is read from both pipes
by one selector loop in the calling thread (no helper threads per run); past the
cap, output is still drained so the command never blocks on a full pipe, but it
is not kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runcache.run import containment
from runcache.run.rlimits import NO_LIMITS, RunLimits
from runcache.run.run_as import RunAs, is_own, without_own

#: How long to keep reading after the command itself exited, for output still
#: held by processes it left behind; then the rest of its group is killed. (In a
#: PID namespace the kernel kills them when the command exits, so the pipes close
#: at once and this applies only to runs contained by their process group.)
EXIT_GRACE_SECONDS = 1.0

#: How long to keep reading after a timeout killed the group, for output
#: already written into the pipes.
KILL_DRAIN_SECONDS = 0.5

#: How often the read loop wakes to check whether the command has exited.
_POLL_SECONDS = 0.1

_READ_SIZE = 1 << 20

#: When a run's time is up: a clock reading that moves on while the run is paused.
Deadline = Callable[[], float]
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True)
class RunContext:
    """Where a run happens and what it is given, when a request says: a working
    directory, variables set over the runner's environment, and standard input
    (without it a command reads end of file at once, never the server's stdin)."""

    cwd: str | None = None
    env: Mapping[str, str] | None = None
    stdin: bytes | None = None
    #: Variables set after ``env`` and left out of the key (``pass_env``): kept out of
    #: ``repr`` so no log line can show them.
    passed_env: Mapping[str, str] | None = field(default=None, compare=False, repr=False)
    #: ``cwd`` held open since it was checked: the run enters this directory, whatever
    #: the path names by then (a link swapped in while the run waited for a slot).
    held: HeldDirectory | None = field(default=None, compare=False)


class HeldDirectory:
    """A directory open by descriptor (``O_PATH``) for as long as something refers to it.

    A request's context lives as long as its plan (answered from the cache, joined to
    an identical run, refused, or run), so the descriptor is closed with the object
    rather than at each of those ends.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def path(self) -> str:
        """The directory's path now, as the kernel names it."""
        return os.readlink(f"/proc/self/fd/{self.fd}")

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


#: A run the request gave no context of its own.
NO_CONTEXT = RunContext()


@dataclass(frozen=True)
class RunResult:
    """What one run of a command produced.

    The output stays raw bytes: :func:`runcache.run.encode.encode_result` decodes
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
    cancelled: bool = False

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

    def note(self, line: bytes) -> None:
        """Append runcache's own line, making room for it at the cap."""
        if len(self.data) + len(line) > self.cap:
            self.truncated = True
            del self.data[max(0, self.cap - len(line)) :]
        self.data += line[: self.cap]


class RunControl:
    """One run as others see and steer it while it goes: its pid, its output so
    far, pause, resume and cancel.

    Made before the run and passed to :meth:`Runner.run`; safe to use from any
    thread. ``on_output`` is called in the run's thread after each chunk is kept,
    so a listener on an event loop can be woken. Time spent paused does not
    count toward the run's timeout.
    """

    def __init__(self, max_output_bytes: int, on_output: Callable[[], None] | None = None) -> None:
        self.stdout = _Capture(max_output_bytes)
        self.stderr = _Capture(max_output_bytes)
        self.on_output = on_output
        self.pid: int | None = None
        #: Whether the run is PID 1 of its own namespace (else only its group holds it).
        self.namespaced = False
        self.cancelled = False
        #: Set once the run is over and its captures are being encoded (and emptied).
        self.sealed = False
        self._lock = threading.Lock()
        self._paused_at: float | None = None
        self._paused_for = 0.0
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def paused_seconds(self) -> float:
        """Seconds spent paused so far, the pause going on included."""
        with self._lock:
            ongoing = 0.0 if self._paused_at is None else time.monotonic() - self._paused_at
            return self._paused_for + ongoing

    def pause(self) -> bool:
        """SIGSTOP to every process of the run (its group, and in a PID namespace every
        process in it); False if it is not running or already paused."""
        with self._lock:
            if self.pid is None or self._paused_at is not None or self.cancelled:
                return False
            if not self._signal(signal.SIGSTOP):
                return False
            self._paused_at = time.monotonic()
        return True

    def resume(self) -> bool:
        """SIGCONT to every process of the run; False if it is not paused."""
        with self._lock:
            if self.pid is None or self._paused_at is None:
                return False
            self._signal(signal.SIGCONT)
            self._paused_for += time.monotonic() - self._paused_at
            self._paused_at = None
        self._wake()  # the deadline moved
        return True

    def cancel(self) -> bool:
        """Kill the run (its group; in a PID namespace, the kernel then kills every process
        in it); False if it has not started or was cancelled already."""
        with self._lock:
            if self.pid is None or self.cancelled:
                return False
            self.cancelled = True
            _kill_group(self.pid)
        self._wake()
        return True

    def _started(self, pid: int, namespaced: bool = False) -> None:
        with self._lock:
            self.pid = pid
            self.namespaced = namespaced
        if self.on_output is not None:  # who follows the run learns its pid
            self.on_output()

    def _signal(self, signum: int) -> bool:
        assert self.pid is not None
        # The group first: it holds the processes that stayed in it, in either mode.
        reached = _signal_group(self.pid, signum)
        if self.namespaced:
            reached = containment.signal_namespace(self.pid, signum) or reached
        return reached

    def _kept(self, capture: _Capture, chunk: bytes) -> None:
        capture.add(chunk)
        if self.on_output is not None:
            self.on_output()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def close(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


class Runner:
    """Runs commands and remembers which are running, so shutdown can kill them all.

    ``containment`` is ``auto``, ``pidns`` or ``group`` (see
    :func:`runcache.run.containment.resolve`; ``pidns`` where the kernel refuses it is
    an OSError here, at start); ``limits`` are applied to every run. Commands see
    ``env`` (runcache's environment when None) without runcache's own variables, and
    run as ``run_as`` when given (:mod:`runcache.run.run_as`).
    """

    def __init__(
        self,
        max_output_bytes: int,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        containment_mode: str = containment.AUTO,
        limits: RunLimits = NO_LIMITS,
        run_as: RunAs | None = None,
    ) -> None:
        self.max_output_bytes = max_output_bytes
        self.run_as = run_as
        env = without_own(env if env is not None else os.environ)
        self.env: dict[str, str] = run_as.environment(env) if run_as is not None else env
        self._user_prefix = run_as.prefix() if run_as is not None else []
        self.cwd = cwd
        self.containment = containment.resolve(containment_mode)
        self.limits = limits
        namespaced = self.containment == containment.PID_NAMESPACE
        self._limit_prefix = limits.prefix(namespaced)
        #: How the PID namespace is made (None: no namespace), and what a command starts
        #: under: unshare (its namespaces and /proc), then the limits.
        self._way = containment.namespace_way() if namespaced else None
        self._prefix = [*containment.spawn_prefix(self._way), *self._limit_prefix]
        self._watchdog = containment.Watchdog()
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """How many commands are running now."""
        return len(self._running)

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        control: RunControl | None = None,
        context: RunContext = NO_CONTEXT,
    ) -> RunResult:
        """Run ``argv`` until it exits, is cancelled, or ``timeout`` seconds pass
        (not counting time paused), whichever is first."""
        own_control = control is None
        control = control or RunControl(self.max_output_bytes)
        timestamp = datetime.now(UTC).isoformat()
        started = time.monotonic()
        try:
            try:
                proc = self._start(argv, context, control)
            except OSError as error:
                message = f"runcache: cannot run {argv[0]!r}: {error.strerror or error}\n"
                control.stderr.add(message.encode())
                return self._result(control, 127, False, 0.0, timestamp)
            cpu_seconds = 0.0
            try:
                timed_out = self._collect(
                    proc, lambda: started + timeout + control.paused_seconds(), control
                )
            finally:
                cpu_seconds = self._finish(proc)
            if not (timed_out or control.cancelled):
                line = self.limits.exceeded(proc.returncode, control.stderr.data, cpu_seconds)
                if line is not None:
                    control.stderr.note(line.encode())
            return self._result(
                control, proc.returncode, timed_out, time.monotonic() - started, timestamp
            )
        finally:
            if own_control:
                control.close()

    @staticmethod
    def _result(
        control: RunControl,
        return_code: int,
        timed_out: bool,
        execution_time: float,
        timestamp: str,
    ) -> RunResult:
        return RunResult(
            stdout=control.stdout.data,
            stderr=control.stderr.data,
            return_code=return_code,
            timed_out=timed_out,
            stdout_truncated=control.stdout.truncated,
            stderr_truncated=control.stderr.truncated,
            execution_time=execution_time,
            timestamp=timestamp,
            cancelled=control.cancelled,
        )

    def _start(
        self, argv: Sequence[str], context: RunContext, control: RunControl
    ) -> subprocess.Popen[bytes]:
        env = self.env
        if context.env or context.passed_env:
            given = {**(context.env or {}), **(context.passed_env or {})}
            env = {**self.env, **{name: value for name, value in given.items() if not is_own(name)}}
        # A held directory is entered by its descriptor: the child's chdir (before exec,
        # before its descriptors close) resolves /proc/self/fd/N to that very directory.
        cwd = f"/proc/self/fd/{context.held.fd}" if context.held else context.cwd or self.cwd
        with _stdin_file(context.stdin) as stdin, self._outputs() as (out, err), self._lock:
            if self._closed:
                raise OSError("runcache is shutting down")
            with self._contained(argv, env):
                proc = subprocess.Popen(
                    [*self._prefix, *self._user_prefix, *argv],
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    env=env,
                    cwd=cwd,
                )
            if out != subprocess.PIPE:
                proc.stdout, proc.stderr = out.reader, err.reader
            # Watched and steerable before it counts as running, since whoever sees it
            # running may cancel it (the first watch starts the watchdog, outside the run's
            # namespace, which takes a few milliseconds).
            self._watchdog.watch(proc.pid)
            control._started(proc.pid, self.containment == containment.PID_NAMESPACE)
            self._running.add(proc.pid)
        for pipe in (proc.stdout, proc.stderr):
            _widen_pipe(pipe)
        return proc

    @contextlib.contextmanager
    def _outputs(self) -> Iterator[tuple[Any, Any]]:
        """The run's stdout and stderr: Popen's pipes, or for another user pipes it owns,
        so that it may reopen them (``echo oops > /dev/stderr``: a pipe's inode belongs
        to whoever made it, mode 0600)."""
        if self.run_as is None:
            yield subprocess.PIPE, subprocess.PIPE
            return
        pipes: list[_OwnedPipe] = []
        try:
            for _ in range(2):  # one by one: a failure closes the ones made
                pipes.append(_OwnedPipe(self.run_as.uid, self.run_as.gid))
            yield pipes[0], pipes[1]
        except BaseException:
            for pipe in pipes:
                pipe.reader.close()
            raise
        finally:
            for pipe in pipes:
                os.close(pipe.writer)

    def _contained(
        self, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> contextlib.AbstractContextManager[None]:
        if self._prefix or self._user_prefix:
            # A wrapper execs the command: a missing program is its exit 127, not the
            # OSError a direct spawn gives. Looked for here, so the answer stays the same.
            containment.check_program(argv[0], env)
        # No preexec_fn: it would turn subprocess's vfork into a fork of the whole server.
        if self._way == containment.BY_THREAD:
            return containment.new_pid_namespace()
        return contextlib.nullcontext()

    def _collect(
        self, proc: subprocess.Popen[bytes], deadline: Deadline, control: RunControl
    ) -> bool:
        """Read both pipes until they close, the deadline passes, or the exit grace ends;
        True if the deadline came first."""
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as selector, _ExitWatch(proc.pid) as exit_watch:
            selector.register(proc.stdout, selectors.EVENT_READ, control.stdout)
            selector.register(proc.stderr, selectors.EVENT_READ, control.stderr)
            selector.register(control._wake_read, selectors.EVENT_READ, _WAKE)
            exit_watch.register(selector)
            reader = _Reader(selector, control)
            timed_out = _read_until_closed(reader, exit_watch, deadline)
            if not timed_out and not reader.pipes_open():
                # Both pipes closed, but the command itself may still be running.
                timed_out = not exit_watch.wait(deadline)
            if timed_out or reader.pipes_open():
                _kill_group(proc.pid)
                drain_until = time.monotonic() + KILL_DRAIN_SECONDS
                while reader.pipes_open() and time.monotonic() < drain_until:
                    reader.read_ready(_POLL_SECONDS)
        return timed_out

    def _finish(self, proc: subprocess.Popen[bytes]) -> float:
        """Kill what is left of the run and reap its leader; the CPU seconds it used."""
        # Kill whatever the command left in its group while the leader's pid is
        # still unreaped, so the group id cannot have been reused yet. (A namespace's
        # PID 1 becomes reapable only once the kernel has killed all the rest.)
        if not _exited(proc.pid):
            _kill_group(proc.pid)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(proc.pid)
        self._watchdog.forget(proc.pid)
        # wait4 for the CPU time of the leader and of what it reaped (a --max-cpu-seconds).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        with self._lock:
            self._running.discard(proc.pid)
        return usage.ru_utime + usage.ru_stime

    def kill_all(self) -> None:
        """Kill every running command (its group, and so its namespace) and refuse new runs;
        the watchdog ends too."""
        with self._lock:
            self._closed = True
            groups = list(self._running)
        for pgid in groups:
            _kill_group(pgid)
        self._watchdog.close()


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

    def wait(self, deadline: Deadline) -> bool:
        """Wait until the process exits; False if the deadline comes first."""
        while not _exited(self.pid):
            remaining = min(deadline() - time.monotonic(), _POLL_SECONDS * 10)
            if remaining <= 0:
                return False
            if self.fd is not None:
                # poll, not select: a busy server's pidfd may be numbered past 1023.
                poller = select.poll()
                poller.register(self.fd, select.POLLIN)
                poller.poll(remaining * 1000)
            else:
                time.sleep(min(_POLL_SECONDS, remaining))
        return True

    def __enter__(self) -> _ExitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _read_until_closed(reader: _Reader, exit_watch: _ExitWatch, deadline: Deadline) -> bool:
    """Read until both pipes close or the exit grace ends; True if the deadline came first."""
    pid = exit_watch.pid
    exited_at: float | None = None
    while reader.pipes_open():
        now = time.monotonic()
        due = deadline()
        if now >= due:
            return not _exited(pid)
        if exited_at is None and _exited(pid):
            exited_at = now
        if exited_at is not None and now - exited_at >= EXIT_GRACE_SECONDS:
            return False
        # While a pidfd watches for the exit, nothing needs a periodic wake-up.
        watched = exited_at is None and exit_watch.armed(reader.selector)
        reader.read_ready(due - now if watched else min(due - now, _POLL_SECONDS))
    return False


#: The selector's mark on a run's wake-up pipe: a pause, resume or cancel moved things.
_WAKE = "wake"


class _Reader:
    """Reads what is ready on a run's pipes into its captures."""

    def __init__(self, selector: selectors.BaseSelector, control: RunControl) -> None:
        self.selector = selector
        self.control = control

    def pipes_open(self) -> bool:
        return any(isinstance(key.data, _Capture) for key in self.selector.get_map().values())

    def read_ready(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:  # the exit watch: the command has exited
                self.selector.unregister(key.fileobj)
            elif key.data is _WAKE:
                os.read(key.fd, 64)
            else:
                chunk = os.read(key.fd, _READ_SIZE)
                if chunk:
                    self.control._kept(key.data, chunk)
                else:
                    self.selector.unregister(key.fileobj)


def _exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it."""
    status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return status is not None and status.si_pid == pid


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def _stdin_file(data: bytes | None) -> Iterator[int]:
    """A run's standard input: /dev/null, or an anonymous in-memory file holding ``data``.

    A file rather than a pipe, so no thread has to feed it and a command that never
    reads it cannot block anything; the child keeps its own descriptor of it.
    """
    if data is None:
        yield subprocess.DEVNULL
        return
    fd = os.memfd_create("runcache-stdin", os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _OwnedPipe:
    """A pipe whose inode belongs to a run's user: its write end goes to the run (Popen
    takes it by :meth:`fileno`), its read end stays with the runner."""

    def __init__(self, uid: int, gid: int) -> None:
        read_fd, self.writer = os.pipe2(os.O_CLOEXEC)
        self.reader = open(read_fd, "rb", buffering=0)  # closed by Runner._finish
        try:
            os.fchown(read_fd, uid, gid)
        except OSError:
            self.reader.close()
            os.close(self.writer)
            raise

    def fileno(self) -> int:
        return self.writer


def _widen_pipe(pipe: object) -> None:
    # Larger pipe buffers mean fewer wake-ups for commands with a lot of output.
    try:
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _READ_SIZE)  # type: ignore[attr-defined]
    except OSError:
        pass
