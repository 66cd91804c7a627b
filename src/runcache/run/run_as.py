"""What of the server a run is given: its environment, and the user it runs as.

A command is the request's, so it must not read what keeps the server's trust:
its settings and tokens (every ``RUNCACHE_*`` variable, whatever ``--env-allow``
or a request's ``env`` says, and any variable holding a secret setting's value)
never reach a command's environment. With ``--run-as USER`` (root only) a command
runs as that user, its primary group and no supplementary groups, so the files
only the server may read (token files, the audit log, the SQLite store, the
server's own ``/proc/PID/environ``) stay out of its reach.

The user is changed by ``setpriv`` (util-linux), the last program of a run's argv
prefix, rather than by ``Popen(user=...)``: CPython 3.11 forks a copy of the server
instead of using vfork when it must change the user (3 ms a spawn more at 10 MiB of
server, 19 ms at 500 MiB, against 2.7 ms for setpriv's exec whatever the server's
size), and the programs before it in the prefix (``prlimit``, the PID namespace's
``pid_max`` script) still run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The prefix of runcache's own variables: settings, tokens, the client's server URL.
OWN_PREFIX = "RUNCACHE_"

#: Variables naming the user, set to the run's user's when the environment has them.
_IDENTITY = ("HOME", "USER", "LOGNAME")


def is_own(name: str) -> bool:
    """Whether ``name`` is one of runcache's own variables, which no command sees."""
    return name.upper().startswith(OWN_PREFIX)


def without_own(env: Mapping[str, str], secrets: Iterable[str] = ()) -> dict[str, str]:
    """``env`` without runcache's own variables, nor any whose value is one of ``secrets``
    (a token exported under another name too)."""
    hidden = {secret for secret in secrets if secret}
    return {name: value for name, value in env.items() if not is_own(name) and value not in hidden}


@dataclass(frozen=True)
class RunAs:
    """The user commands run as (``--run-as``), looked up once at start."""

    name: str
    uid: int
    gid: int
    home: str
    #: The ``setpriv`` that switches to the user, found at start.
    setpriv: str

    @classmethod
    def lookup(cls, user: str) -> RunAs:
        """The user named ``user`` (or numbered, if no user has that name); ValueError
        says why it cannot be run as."""
        if os.geteuid() != 0:
            raise ValueError(
                f"run_as {user!r} needs runcache to run as root (it runs as uid {os.geteuid()})"
            )
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ValueError(f"run_as: no user {user!r} on this machine") from None
            try:
                entry = pwd.getpwuid(int(user))
            except KeyError:
                raise ValueError(f"run_as: no user {user!r} on this machine") from None
        setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        if setpriv is None:
            raise ValueError("run_as needs setpriv (util-linux), which is not installed")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, setpriv)

    def prefix(self) -> list[str]:
        """The argv that runs what follows it as this user: real, effective and saved ids
        changed (which drops root's capabilities), supplementary groups cleared."""
        return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with HOME, USER and LOGNAME, those it has, set to this user's."""
        own = {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}
        return {name: own[name] if name in _IDENTITY else value for name, value in env.items()}
