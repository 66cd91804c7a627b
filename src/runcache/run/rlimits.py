"""Per-run resource limits: what one command may use of the machine everyone's cache runs on.

The limits are the kernel's rlimits, set on the command's leader before it
starts and inherited by every process it starts, so each of them is held to
them (``--max-memory`` is address space per process, ``--max-cpu-seconds`` CPU
time per process). They are set by starting the leader under util-linux's
``prlimit``, which sets them on itself and execs the command: one exec more,
and only when a limit is set. ``preexec_fn`` would do it without the exec, but
it makes every spawn fork a copy of the server instead of using vfork (4-5 ms
instead of about 1 ms); ``prlimit(pid)`` after the spawn would race with the
command's first fork.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass

#: What a failing command's stderr says when its allocation was refused, or a file
#: could not be opened, by the usual programs (Python, libc's strerror, GNU tools, C++).
_MEMORY_SIGNS = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"out of memory",
    b"memory exhausted",
    b"std::bad_alloc",
)
_OPEN_FILES_SIGNS = (b"Too many open files",)
_FILE_SIZE_SIGNS = (b"File too large",)
_PROCESS_SIGNS = (
    b"Cannot fork",
    b"Resource temporarily unavailable",
    b"fork: retry",
    b"BlockingIOError",
)

#: Sets the run's PID namespace's pid_max from inside it (its PID 1 is then its only
#: process), and runs the command in its place: "$@" is the command's argv.
_PID_MAX_SCRIPT = 'echo {} > /proc/sys/kernel/pid_max || exit 126; exec "$@"'

#: The kernel from which pid_max belongs to each PID namespace (before it, writing it from
#: inside one would set the whole machine's).
_PER_NAMESPACE_PID_MAX = (6, 14)

_UNITS = "KMGT"


@dataclass(frozen=True)
class RunLimits:
    """The limits each run is held to; 0 means none."""

    memory: int = 0
    cpu_seconds: int = 0
    file_size: int = 0
    open_files: int = 0
    #: Processes at once in the run's PID namespace (its pid_max less one).
    processes: int = 0

    def __bool__(self) -> bool:
        return any((self.memory, self.cpu_seconds, self.file_size, self.open_files, self.processes))

    def prefix(self, namespaced: bool) -> list[str]:
        """The command line that sets these limits and then runs a command (empty if there
        are none); OSError if this machine cannot set them."""
        argv = self._rlimits()
        if self.processes:
            if not namespaced:
                raise OSError("max_processes needs a PID namespace per run (containment pidns)")
            if _kernel() < _PER_NAMESPACE_PID_MAX:
                raise OSError(
                    "max_processes needs Linux 6.14 or later (pid_max per PID "
                    f"namespace); this is {os.uname().release}"
                )
            # pids 1 to N: pid_max is one past the largest pid
            argv += ["/bin/sh", "-c", _PID_MAX_SCRIPT.format(self.processes + 1), "runcache-limit"]
        return argv

    def _rlimits(self) -> list[str]:
        if not (self.memory or self.cpu_seconds or self.file_size or self.open_files):
            return []
        program = shutil.which("prlimit") or shutil.which("prlimit", path="/usr/bin:/bin")
        if program is None:
            raise OSError("per-run limits need util-linux's prlimit, which is not on PATH")
        argv = [program]
        if self.memory:
            argv.append(f"--as={self.memory}")
        if self.cpu_seconds:
            # SIGXCPU at the limit, SIGKILL a second later for a command that catches it
            # (or is a PID 1, which the kernel spares SIGXCPU).
            argv.append(f"--cpu={self.cpu_seconds}:{self.cpu_seconds + 1}")
        if self.file_size:
            argv.append(f"--fsize={self.file_size}")
        if self.open_files:
            argv.append(f"--nofile={self.open_files}")
        return [*argv, "--"]

    def exceeded(
        self, return_code: int, stderr: bytes | bytearray, cpu_seconds: float
    ) -> str | None:
        """The line that says which limit a failed run went over, when it shows.

        A signal from the kernel (SIGXCPU, SIGXFSZ, the SIGKILL at the hard CPU
        limit) or the CPU time spent says so for sure; a refused allocation or
        open shows only in what the command printed, so those are judged by the
        usual error messages. A run that exited 0 went over nothing it noticed.
        """
        if return_code == 0 or not self:
            return None
        killed_by = -return_code if return_code < 0 else return_code - 128
        if self.cpu_seconds and (cpu_seconds >= self.cpu_seconds or killed_by == signal.SIGXCPU):
            return _line("--max-cpu-seconds", str(self.cpu_seconds))
        if self.file_size and (
            killed_by == signal.SIGXFSZ or any(sign in stderr for sign in _FILE_SIZE_SIGNS)
        ):
            return _line("--max-file-size", format_size(self.file_size))
        if self.memory and any(sign in stderr for sign in _MEMORY_SIGNS):
            return _line("--max-memory", format_size(self.memory))
        if self.open_files and any(sign in stderr for sign in _OPEN_FILES_SIGNS):
            return _line("--max-open-files", str(self.open_files))
        if self.processes and any(sign in stderr for sign in _PROCESS_SIGNS):
            return _line("--max-processes", str(self.processes))
        return None


#: Per-run limits that limit nothing.
NO_LIMITS = RunLimits()


def _line(flag: str, value: str) -> str:
    return f"runcache: the run exceeded {flag} {value}\n"


def format_size(size: int) -> str:
    """``536870912`` as ``512M``: the largest binary unit that divides it exactly."""
    for power, unit in reversed(list(enumerate(_UNITS, start=1))):
        if size and size % (1 << 10 * power) == 0:
            return f"{size >> 10 * power}{unit}"
    return str(size)


def _kernel() -> tuple[int, int]:
    """The running kernel's major and minor version."""
    numbers = os.uname().release.split("-")[0].split(".")
    try:
        return int(numbers[0]), int(numbers[1])
    except (IndexError, ValueError):
        return (0, 0)
