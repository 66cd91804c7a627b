"""Keeping a run's processes together, so that none outlives the run.

A process group is not enough: a command can leave it (``setsid``, ``setpgid``,
``set -m``) and then nothing that kills the group reaches it. Where the kernel
allows, each command starts as PID 1 of a PID namespace of its own. The kernel
then does the containing: every process the command starts, whatever session
or group it makes, is in that namespace, and when its PID 1 dies, by exiting or
by SIGKILL, the kernel kills all of them.

Two ways make the namespace:

- With CAP_SYS_ADMIN (root), without ``preexec_fn`` (which would make
  ``subprocess`` fork a copy of the server instead of using vfork: 1 ms became
  4-5 ms a spawn): ``unshare(CLONE_NEWPID)`` changes only which namespace the
  *calling thread's* next children go to, so the run's own thread unshares,
  spawns, and ``setns`` back to the server's namespace. No other thread is
  affected. The command is PID 1 and its leader.
- As any other user, where the kernel lets unprivileged users make user
  namespaces: the kernel refuses ``unshare(CLONE_NEWUSER)`` to a multithreaded
  process, so the command is started under util-linux's ``unshare --user
  --map-current-user --pid --fork --kill-child``: that leader makes a user
  namespace mapping the user to itself, a PID namespace it owns, and forks the
  command as its PID 1 (killed by the kernel if the leader dies).

Either way the command's processes get a mount namespace with a ``/proc`` of
their PID namespace (``unshare --mount-proc``): they see their own processes
only, not the server's (whose ``/proc/PID/environ`` holds its secrets) nor the
watchdog's.

A server killed with SIGKILL cannot kill its runs, so one small watchdog
process per runner holds a pidfd of every running command's leader, learned
over a socket (``open`` of ``/proc/PID/fd/0`` fails for a socket, so nothing
but the server writes to it; lines that do not parse are skipped); when the
socket reaches end of file (the server died, or stopped and closed it) the
watchdog SIGKILLs each leader still alive and its namespace (or its process
group, where there is no namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping

#: The kinds of containment a runner can use (``--containment``).
AUTO, PID_NAMESPACE, PROCESS_GROUP = "auto", "pidns", "group"
MODES = (AUTO, PID_NAMESPACE, PROCESS_GROUP)

#: How a PID namespace is made: by the spawning thread (CAP_SYS_ADMIN), or by util-linux's
#: ``unshare`` in a user namespace (any user, where the kernel allows it).
BY_THREAD, BY_USER_NAMESPACE = "thread", "userns"

_CLONE_NEWPID = 0x20000000
_PR_SET_DUMPABLE = 4

#: What the kernel tells of unprivileged user namespaces: (sysctl file, value that
#: forbids them, what to say).
_USERNS_SWITCHES = (
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        "1",
        "AppArmor restricts unprivileged user namespaces to the programs its policy names "
        "(kernel.apparmor_restrict_unprivileged_userns=1, as on Ubuntu 24.04): give "
        "/usr/bin/unshare a profile with `userns,` or set the sysctl to 0",
    ),
    (
        "/proc/sys/kernel/unprivileged_userns_clone",
        "0",
        "the kernel forbids unprivileged user namespaces (kernel.unprivileged_userns_clone=0)",
    ),
    (
        "/proc/sys/user/max_user_namespaces",
        "0",
        "the kernel allows no user namespaces (user.max_user_namespaces=0)",
    ),
)

log = logging.getLogger("runcache")

#: How many times a pause looks again for processes that appeared while it stopped others.
_STOP_PASSES = 10

_libc = ctypes.CDLL(None, use_errno=True)
#: The kernel's answer, asked once a process (it cannot change while the process runs):
#: how runs get a PID namespace (None: they cannot), and why not.
_probed: tuple[str | None, str] | None = None
_probe_lock = threading.Lock()


def pid_namespaces_available() -> bool:
    """Whether this process may give each command a PID namespace (asked the kernel once)."""
    return namespace_way() is not None


def namespace_way() -> str | None:
    """How this process gives a command a PID namespace: ``thread`` (CAP_SYS_ADMIN),
    ``userns`` (a user namespace of its own), or None where the kernel allows neither."""
    return _probe()[0]


def _probe() -> tuple[str | None, str]:
    global _probed
    with _probe_lock:
        if _probed is None:
            answer: list[bool] = []
            # In a thread of its own, so a failure cannot leave the caller's thread changed.
            probe = threading.Thread(target=lambda: answer.append(_try_namespace()))
            probe.start()
            probe.join()
            _probed = (BY_THREAD, "") if answer == [True] else _try_user_namespace()
        return _probed


def _try_namespace() -> bool:
    try:
        with new_pid_namespace():
            return True
    except OSError:
        return False


def _try_user_namespace() -> tuple[str | None, str]:
    """Whether ``unshare`` makes a run's namespaces as this user; else why not."""
    program = _unshare()
    if program is None:
        return None, "util-linux's unshare is not on PATH"
    try:
        done = subprocess.run(
            [*_user_prefix(program), "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"unshare failed: {error}"
    if done.returncode == 0:
        return BY_USER_NAMESPACE, ""
    for path, forbidding, cause in _USERNS_SWITCHES:
        with contextlib.suppress(OSError), open(path) as switch:
            if switch.read().strip() == forbidding:
                return None, cause
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return None, f"the kernel refused them ({said[-1] if said else done.returncode})"


def _unshare() -> str | None:
    return shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")


def _user_prefix(program: str) -> list[str]:
    return [
        program,
        "--user",
        "--map-current-user",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
    ]


def spawn_prefix(way: str | None) -> list[str]:
    """What a command is started under for ``way`` (:func:`namespace_way`): a mount
    namespace with its PID namespace's own ``/proc``, and for ``userns`` the user and
    PID namespaces too. Empty without a namespace, or without ``unshare`` as root."""
    program = _unshare()
    if way is None or program is None:
        return []
    if way == BY_USER_NAMESPACE:
        return _user_prefix(program)
    # The thread made the PID namespace: the leader, its PID 1, mounts its /proc and
    # execs the command in place.
    return [program, "--mount-proc", "--"]


def check_program(program: str, env: Mapping[str, str] | None) -> None:
    """FileNotFoundError if ``program`` is neither an executable path nor found on the
    PATH of ``env`` (the server's own without one), as a spawn would say. A relative
    path with a slash is left to the wrapper: it is relative to the run's directory."""
    if "/" in program and not program.startswith("/"):
        return
    path = (os.environ if env is None else env).get("PATH", os.defpath)
    if shutil.which(program, path=path) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def resolve(mode: str) -> str:
    """The containment a runner asked for ``mode`` uses: ``pidns`` or ``group``.

    ``auto`` is a PID namespace where the kernel allows one; ``pidns`` where it
    does not is an OSError, so a server asked for it refuses to start. Says once,
    in the log, how runs are contained.
    """
    if mode not in MODES:
        raise ValueError(f"containment must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == PROCESS_GROUP:
        return PROCESS_GROUP
    way, cause = _probe()
    if way == BY_USER_NAMESPACE:
        log.info(
            "runs are contained in PID namespaces of their own, in user namespaces "
            "(util-linux unshare), each with its own /proc"
        )
        return PID_NAMESPACE
    if way == BY_THREAD:
        if _unshare() is None:
            log.warning("runs see the machine's /proc: util-linux's unshare is not on PATH")
        return PID_NAMESPACE
    if mode == PID_NAMESPACE:
        raise OSError(
            "containment pidns needs CAP_SYS_ADMIN (run as root) or unprivileged "
            f"user namespaces, and {cause}; or use auto or group"
        )
    log.warning(
        "runs are contained by their process group only: PID namespaces need "
        "CAP_SYS_ADMIN or unprivileged user namespaces, and %s; so a process that "
        "leaves its group (setsid, setpgid, set -m) outlives its run, and a run "
        "sees and may signal the server's processes",
        cause,
    )
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
                raise OSError(
                    error, f"setns back to runcache's PID namespace: {os.strerror(error)}"
                )
    finally:
        os.close(own)


def signal_namespace(leader: int, signum: int) -> bool:
    """Send ``signum`` to every process in the PID namespace ``leader`` heads (it is its
    PID 1, or the ``unshare`` that made it); False if there was nobody to signal.

    The processes are found by their namespace (``/proc/PID/ns/pid``), each
    signalled through a pidfd so a pid reused meanwhile is never hit. A stop is
    repeated until a pass finds nobody new, since a process may fork while
    others are being stopped; a stopped one cannot. The caller's own namespace
    is never signalled (an ``unshare`` leader that has not made its namespace yet).
    """
    namespace = _namespace_of(leader)
    if namespace is None:
        return False
    done: set[int] = set()
    for _ in range(_STOP_PASSES if signum == signal.SIGSTOP else 1):
        found = _signal_members(namespace, signum, done)
        if not found:
            break
        done |= found
    return bool(done)


def _namespace_of(leader: int) -> str | None:
    """The PID namespace a run's leader heads: its own, or (an ``unshare`` leader, outside
    it) the one its children go to; None if gone or none but the caller's."""
    own = os.readlink("/proc/self/ns/pid")
    try:
        namespace = os.readlink(f"/proc/{leader}/ns/pid")
        if namespace == own:
            namespace = os.readlink(f"/proc/{leader}/ns/pid_for_children")
    except OSError:
        return None
    return None if namespace == own else namespace


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
        self._pipe: socket.socket | None = None
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
                self._pipe.close()
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
            self._pipe.close()
        # A socket, not a pipe: a process of the same user can open a pipe through
        # /proc/PID/fd/0 and write to it, but not a socket. Neither end is inherited
        # by commands.
        self._pipe, theirs = socket.socketpair()
        try:
            # Its own session: a Ctrl-C at the server's terminal is for the server.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "runcache.run.containment"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._send("".join(f"+{pid}\n" for pid in self._watched))

    def _send(self, lines: str) -> None:
        assert self._pipe is not None
        try:
            self._pipe.sendall(lines.encode())  # under the lock: lines never interleave
        except OSError:
            # The watchdog died (someone killed it): the next watch starts another.
            if self._process is not None:
                self._process.poll()


def _watch_stdin() -> None:
    """The watchdog's loop: ``+PID`` / ``-PID`` lines on stdin; at end of file, SIGKILL
    the leaders still held and their namespaces. A pidfd taken at ``+PID`` (the leader is
    then its server's unreaped child) pins the process, so a pid reused later is never
    killed. Nothing read can end it but end of file: a line that does not parse is
    skipped."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    # Not dumpable: a process of the same user cannot open its /proc/PID/fd or ptrace it.
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    held: dict[int, int] = {}
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            break
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()[-64:]  # a line is short: garbage without newlines stays small
        for line in lines:
            _apply(line, held)
    for pid, fd in held.items():
        _kill_held(pid, fd)


def _apply(line: bytes, held: dict[int, int]) -> None:
    """Take in one ``+PID`` or ``-PID`` line; anything else is ignored."""
    sign, digits = line[:1], line[1:]
    if sign not in (b"+", b"-") or not digits.isdigit() or len(digits) > 10:
        return
    pid = int(digits)
    if sign == b"+" and pid not in held:
        with contextlib.suppress(OSError):
            held[pid] = os.pidfd_open(pid)
    elif sign == b"-" and pid in held:
        os.close(held.pop(pid))


def _kill_held(pid: int, fd: int) -> None:
    poller = select.poll()  # not select: a pidfd may be numbered past 1023
    poller.register(fd, select.POLLIN)
    if poller.poll(0):
        return  # it has exited: its pid may belong to another process now
    with contextlib.suppress(OSError):
        # Its namespace first (read through the leader, while it lives), for an unshare
        # leader whose PID 1 left its group: the kernel would kill that PID 1 when the
        # leader dies, but need not be waited for.
        signal_namespace(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)  # its group, where there is no namespace
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(fd, signal.SIGKILL)


if __name__ == "__main__":
    _watch_stdin()
