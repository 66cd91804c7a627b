"""Keeping a run's processes together, so that none outlives the run.

A process group is not enough: a command can leave it (``setsid``, ``setpgid``,
``set -m``) and then nothing that kills the group reaches it. Where runcache
may (CAP_SYS_ADMIN, e.g. as root), each command starts as PID 1 of a PID
namespace of its own. The kernel then does the containing: every process the
command starts, whatever session or group it makes, is in that namespace, and
when its PID 1 dies, by exiting or by SIGKILL, the kernel kills all of them.

The namespace is made without ``preexec_fn`` (which would make ``subprocess``
fork a copy of the server instead of using vfork: 1 ms became 4-5 ms a spawn):
``unshare(CLONE_NEWPID)`` changes only which namespace the *calling thread's*
next children go to, so the run's own thread unshares, spawns, and ``setns``
back to the server's namespace. No other thread is affected.

A server killed with SIGKILL cannot kill its runs, so one small watchdog
process per runner holds a pidfd of every running command's leader, learned
over a pipe; when the pipe reaches end of file (the server died, or stopped
and closed it) the watchdog SIGKILLs each leader still alive, which takes its
namespace with it (or its process group, where there is no namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

#: The kinds of containment a runner can use (``--containment``).
AUTO, PID_NAMESPACE, PROCESS_GROUP = "auto", "pidns", "group"
MODES = (AUTO, PID_NAMESPACE, PROCESS_GROUP)

_CLONE_NEWPID = 0x20000000

log = logging.getLogger("runcache")

#: How many times a pause looks again for processes that appeared while it stopped others.
_STOP_PASSES = 10

_libc = ctypes.CDLL(None, use_errno=True)
_probed: bool | None = None
_probe_lock = threading.Lock()


def pid_namespaces_available() -> bool:
    """Whether this process may give each command a PID namespace (asked the kernel once)."""
    global _probed
    with _probe_lock:
        if _probed is None:
            answer: list[bool] = []
            # In a thread of its own, so a failure cannot leave the caller's thread changed.
            probe = threading.Thread(target=lambda: answer.append(_try_namespace()))
            probe.start()
            probe.join()
            _probed = answer == [True]
        return _probed


def _try_namespace() -> bool:
    try:
        with new_pid_namespace():
            return True
    except OSError:
        return False


def resolve(mode: str) -> str:
    """The containment a runner asked for ``mode`` uses: ``pidns`` or ``group``.

    ``auto`` is a PID namespace where the kernel allows one; ``pidns`` where it
    does not is an OSError, so a server asked for it refuses to start.
    """
    if mode not in MODES:
        raise ValueError(f"containment must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == PROCESS_GROUP:
        return PROCESS_GROUP
    if pid_namespaces_available():
        return PID_NAMESPACE
    if mode == PID_NAMESPACE:
        raise OSError("containment pidns needs CAP_SYS_ADMIN (run as root), or use auto or group")
    log.warning("runs are contained by their process group only: PID namespaces need "
                "CAP_SYS_ADMIN, so a process that leaves its group (setsid, setpgid, set -m) "
                "outlives its run")
    return PROCESS_GROUP


@contextlib.contextmanager
def new_pid_namespace() -> Iterator[None]:
    """Within the block, children this thread starts are PID 1 of a new PID namespace."""
    own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(_CLONE_NEWPID) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"unshare(CLONE_NEWPID): {os.strerror(error)}")
        try:
            yield
        finally:
            # Back to the server's namespace, so the next unshare of this thread works
            # (a second one from a thread whose children go elsewhere is EINVAL).
            if _libc.setns(own, _CLONE_NEWPID) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns back to runcache's PID namespace: "
                              f"{os.strerror(error)}")
    finally:
        os.close(own)


def signal_namespace(leader: int, signum: int) -> bool:
    """Send ``signum`` to every process in the PID namespace whose PID 1 is ``leader``;
    False if the leader is gone.

    The processes are found by their namespace (``/proc/PID/ns/pid``), each
    signalled through a pidfd so a pid reused meanwhile is never hit. A stop is
    repeated until a pass finds nobody new, since a process may fork while
    others are being stopped; a stopped one cannot.
    """
    try:
        namespace = os.readlink(f"/proc/{leader}/ns/pid")
    except OSError:
        return False
    done: set[int] = set()
    for _ in range(_STOP_PASSES if signum == signal.SIGSTOP else 1):
        found = _signal_members(namespace, signum, done)
        if not found:
            break
        done |= found
    return leader in done


def _signal_members(namespace: str, signum: int, skip: set[int]) -> set[int]:
    signalled = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            # Checked after the pidfd is held: if the pid was reused in between,
            # the pidfd names a process that is gone and the signal fails.
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                signal.pidfd_send_signal(fd, signum)
                signalled.add(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    return signalled


class Watchdog:
    """A process that kills every running command's leader if this one dies.

    Started at the first :meth:`watch`; :meth:`close` ends it (and it kills
    whatever it still watches). Safe to use from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None
        self._watched: set[int] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def watch(self, pid: int) -> None:
        """Tell the watchdog of a leader; called while the leader is unreaped."""
        with self._lock:
            if self._closed:
                return
            self._watched.add(pid)
            if self._process is None or self._process.poll() is not None:
                self._start()  # tells it of every watched pid, this one included
            else:
                self._send(f"+{pid}\n")

    def forget(self, pid: int) -> None:
        """The leader is about to be reaped: its pid may be reused after this."""
        with self._lock:
            self._watched.discard(pid)
            if not self._closed and self._pipe is not None:
                self._send(f"-{pid}\n")

    def close(self) -> None:
        """End the watchdog: it kills whatever it still watches, then exits."""
        with self._lock:
            self._closed = True
            if self._pipe is not None:
                os.close(self._pipe)
                self._pipe = None
            process, self._process = self._process, None
            idle = not self._watched
        if process is None:
            return
        if idle:
            # Nothing left for it to kill: no need to wait while it starts up to see that.
            process.kill()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __del__(self) -> None:
        # A runner dropped without kill_all: its watchdog ends, not lingers.
        with contextlib.suppress(Exception):  # late in the interpreter's exit, modules go
            self.close()

    def _start(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
        read, self._pipe = os.pipe()  # neither end is inherited by commands
        try:
            # Its own session: a Ctrl-C at the server's terminal is for the server.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "runcache.containment"], stdin=read,
                stdout=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            os.close(read)
        self._send("".join(f"+{pid}\n" for pid in self._watched))

    def _send(self, lines: str) -> None:
        assert self._pipe is not None
        try:
            os.write(self._pipe, lines.encode())  # under PIPE_BUF a line: never interleaved
        except OSError:
            # The watchdog died (someone killed it): the next watch starts another.
            if self._process is not None:
                self._process.poll()


def _watch_stdin() -> None:
    """The watchdog's loop: ``+PID`` / ``-PID`` lines on stdin; at end of file, SIGKILL
    the leaders still held. A pidfd taken at ``+PID`` (the leader is then its server's
    unreaped child) pins the process, so a pid reused later is never killed."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    held: dict[int, int] = {}
    pending = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            pid = int(line[1:])
            if line.startswith(b"+"):
                with contextlib.suppress(OSError):
                    held[pid] = os.pidfd_open(pid)
            elif pid in held:
                os.close(held.pop(pid))
    for pid, fd in held.items():
        poller = select.poll()  # not select: a pidfd may be numbered past 1023
        poller.register(fd, select.POLLIN)
        if poller.poll(0):
            continue  # it has exited: its pid may belong to another process now
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # its group, where there is no namespace
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)


if __name__ == "__main__":
    _watch_stdin()
