"""Allowlist mode: commands run without a shell, and only the executables named.

With ``--allow nmap,curl,dig`` a command string is split like a shell would
(``shlex``) but never given to one: anything a shell would treat as syntax
(``; | & $ ( ) < >``, backquotes, a newline) is refused, naming the offending
part, rather than passed on as a literal a client did not mean. Quoted text
stays literal, so ``curl 'https://host/?a=1&b=2'`` is fine.

The executable is resolved once, at start, on the PATH commands run with, and
must be the very file an allowed name resolves to: ``/tmp/evil/nmap`` does not
pass because it is called ``nmap``. The command then runs that resolved path,
so what was checked is what runs.

A program that runs other programs (a shell, ``env``, ``find -exec``, ``git``'s
aliases, an interpreter) would make the list meaningless: ``env sh -c id``
runs anything. Such a program is refused at start unless the operator names it
in ``--allow-runners`` too, saying they mean it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence

from runcache.errors import BadRequest, ConfigError

#: Characters a shell treats as syntax when they are not quoted.
SHELL_SYNTAX = frozenset(";|&$()<>`\n\r")

#: Inside double quotes a shell still expands these.
_EXPANDED_IN_DOUBLE_QUOTES = frozenset("$`")


#: Programs that run other programs, by what lets them: allowing one allows anything.
RUNNERS: dict[str, str] = {
    **dict.fromkeys(
        ("sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "busybox", "rbash"),
        "a shell",
    ),
    **dict.fromkeys(
        (
            "env",
            "nice",
            "nohup",
            "timeout",
            "setsid",
            "sudo",
            "su",
            "doas",
            "chroot",
            "unshare",
            "nsenter",
            "stdbuf",
            "taskset",
            "ionice",
            "chrt",
            "flock",
            "time",
            "watch",
            "xargs",
            "parallel",
            "script",
            "strace",
            "ltrace",
            "gdb",
            "capsh",
            "runuser",
            "systemd-run",
            "ssh",
            "expect",
        ),
        "it runs the command given in its arguments",
    ),
    "find": "-exec and -ok run any program",
    "git": "aliases (-c alias.x='!cmd') and ext:: remotes run any program",
    **dict.fromkeys(
        (
            "awk",
            "gawk",
            "mawk",
            "nawk",
            "sed",
            "make",
            "tar",
            "rsync",
            "zip",
            "vi",
            "vim",
            "ex",
            "ed",
            "less",
            "more",
            "man",
            "docker",
            "kubectl",
            "npx",
            "npm",
            "pip",
            "pip3",
        ),
        "it has an option or command that runs any program",
    ),
}

#: Interpreters, versioned or not (python3.11, perl5.36): a script argument is any program.
_INTERPRETER = re.compile(
    r"(python|pypy|perl|ruby|php|lua|luajit|node|nodejs|deno|bun|tclsh|wish|Rscript|R|"
    r"java|jshell|osascript|pwsh|powershell|guile|racket|sbcl|ghci|irb|julia)[0-9.]*"
)


def runs_programs(name: str) -> str | None:
    """Why ``name`` (a program's file name) can run any other program, or None."""
    if name in RUNNERS:
        return RUNNERS[name]
    if _INTERPRETER.fullmatch(name):
        return "an interpreter runs any program it is given"
    return None


class Allowlist:
    """The executables commands may run, and the parsing that enforces it."""

    def __init__(
        self,
        names: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        runners: Sequence[str] = (),
    ) -> None:
        self.names = tuple(sorted(set(names)))
        self._path = env.get("PATH", os.defpath)
        self._cwd = cwd or os.getcwd()
        # Resolved once: checking a request (every one, hits included) then
        # touches no file system.
        self._paths = {name: self.resolve(name) for name in self.names}
        missing = [name for name, path in self._paths.items() if path is None]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not found on PATH {self._path!r}; "
                "install it or remove it from the list"
            )
        self._refuse_runners(set(runners))

    def _refuse_runners(self, meant: set[str]) -> None:
        """Refuse a program that runs programs (by its name, or the file it resolves to,
        e.g. ``sh`` to ``dash``) unless ``meant`` names it."""
        for name in self.names:
            if name in meant:
                continue
            target = os.path.basename(os.path.realpath(self._paths[name] or name))
            reason = runs_programs(name) or runs_programs(target)
            if reason is not None:
                raise ConfigError(
                    f"{name} runs other programs ({reason}), so allowing it allows "
                    f"every program; remove it, or also list it in --allow-runners "
                    f"(RUNCACHE_ALLOW_RUNNERS) if that is what you mean"
                )

    def resolve(self, name: str) -> str | None:
        """The absolute path ``name`` runs on the commands' PATH, or None."""
        found = shutil.which(name, path=self._path)
        if found is None:
            return None
        return os.path.normpath(os.path.join(self._cwd, found))

    def argv(self, command: str) -> list[str]:
        """Split ``command`` into the argument vector to run; BadRequest says what is refused."""
        offending = shell_syntax(command)
        if offending is not None:
            raise BadRequest(
                f"shell syntax {offending!r} is not allowed: this server runs commands without "
                "a shell; send one command and its arguments, quoting any literal use"
            )
        try:
            argv = shlex.split(command)
        except ValueError as error:
            raise BadRequest(f"command cannot be split into arguments: {error}") from None
        if not argv:
            raise BadRequest("Command parameter is required")
        return [self._executable(argv[0]), *argv[1:]]

    def _executable(self, program: str) -> str:
        allowed = ", ".join(self.names)
        if "/" in program:
            path = os.path.normpath(os.path.join(self._cwd, program))
            name = os.path.basename(path)
            if self._paths.get(name) == path:
                return path
            raise BadRequest(
                f"{program!r} is not an allowed executable: allowed are {allowed}, "
                "by name or by the path PATH resolves them to"
            )
        resolved = self._paths.get(program)
        if resolved is None:
            raise BadRequest(f"{program!r} is not an allowed executable: allowed are {allowed}")
        return resolved


def shell_syntax(command: str) -> str | None:
    """The first unquoted piece of shell syntax in ``command`` (with what follows it), or None.

    Follows POSIX quoting as ``shlex`` does: a backslash escapes the next
    character, single quotes keep everything literal, double quotes keep all but
    ``$`` and backquotes, which a shell would expand there.
    """
    quote = ""
    index = 0
    while index < len(command):
        char = command[index]
        if quote == "'":
            if char == "'":
                quote = ""
        elif char == "\\":
            index += 1  # the escaped character is literal, in or out of double quotes
        elif quote == '"':
            if char == '"':
                quote = ""
            elif char in _EXPANDED_IN_DOUBLE_QUOTES:
                return _operator(command, index)
        elif char in "'\"":
            quote = char
        elif char in SHELL_SYNTAX:
            return _operator(command, index)
        index += 1
    return None


def _operator(command: str, start: int) -> str:
    # Name the whole operator (``&&``, ``$(``, ``>>``), not just its first character.
    end = start + 1
    while end < len(command) and command[end] in SHELL_SYNTAX and end - start < 3:
        end += 1
    return command[start:end]
