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
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence

from runcache.errors import BadRequest, ConfigError

#: Characters a shell treats as syntax when they are not quoted.
SHELL_SYNTAX = frozenset(";|&$()<>`\n\r")

#: Inside double quotes a shell still expands these.
_EXPANDED_IN_DOUBLE_QUOTES = frozenset("$`")


class Allowlist:
    """The executables commands may run, and the parsing that enforces it."""

    def __init__(self, names: Sequence[str], env: Mapping[str, str], cwd: str | None) -> None:
        self.names = tuple(sorted(set(names)))
        self._path = env.get("PATH", os.defpath)
        self._cwd = cwd or os.getcwd()
        # Resolved once: checking a request (every one, hits included) then
        # touches no file system.
        self._paths = {name: self.resolve(name) for name in self.names}
        missing = [name for name, path in self._paths.items() if path is None]
        if missing:
            raise ConfigError(
                f"allow: {', '.join(missing)} not found on PATH {self._path!r}; "
                "install it or remove it from the list"
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
