"""The cache key of a command's result, in one place light enough for every way in.

The engine keys each result on this; ``runcache run``'s light hit path
(:mod:`runcache.client.cached`) computes the same key before anything heavy is
imported, so both must call these functions, never a copy. Hence the standard
library only: ``json`` (its compact, sorted, non-ASCII output is byte for byte
what orjson writes for these shapes), ``hashlib`` and ``shlex`` cost a process
start a few milliseconds where orjson and msgspec cost tens.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Collection, Mapping

#: The shell that runs a command string, as the contract has it.
SHELL = ("/bin/sh", "-c")

#: Environment variables whose values go into the cache key: a command that
#: sees another PATH, home, user, locale or time zone may well print something else.
KEY_ENV_VARS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ")

#: The exit codes whose results are cached unless a request says otherwise.
DEFAULT_CACHE_EXIT_CODES = (0,)

#: The same, as the set a plan compares with (made once: every hit plans with it).
DEFAULT_EXIT_CODES = frozenset(DEFAULT_CACHE_EXIT_CODES)

#: ``--max-output-bytes`` unless set: it is in every key (a result cut at another cap
#: is another answer), so the light hit path needs it without reading the settings.
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024


def canonical_json(value: object) -> bytes:
    """``value`` as compact JSON with sorted keys, UTF-8 (non-ASCII as is)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_context(shell: object, cwd: str, env: Mapping[str, str], max_output_bytes: int) -> bytes:
    """What every key of one engine starts with: how commands run (``shell``), where,
    with which of :data:`KEY_ENV_VARS`, and the output cap."""
    context = {
        "shell": shell,
        "cwd": cwd,
        "env": {name: env.get(name) for name in KEY_ENV_VARS},
        "max_output_bytes": max_output_bytes,
    }
    return canonical_json(context) + b"\0"


def cache_key(
    prefix: bytes,
    command: str,
    context_part: bytes = b"",
    cache_exit_codes: Collection[int] = DEFAULT_EXIT_CODES,
    scope: str | None = None,
) -> str:
    """The key of a command's result: the engine's :func:`key_context` (``prefix``), the
    command, its run context's part, the exit codes that are answers when not the
    default (a request that counts only 0 as an answer must not be answered with
    another's exit 1), and its scope when it has one (no scope keeps the keys of caches
    made before scopes)."""
    text = prefix + command.encode() + context_part
    if frozenset(cache_exit_codes) != DEFAULT_EXIT_CODES:
        text += b"\0exit:" + ",".join(map(str, sorted(cache_exit_codes))).encode()
    if scope:
        text += b"\0scope:" + scope.encode()
    return hashlib.sha256(text).hexdigest()


def command_text(argv: Collection[str]) -> str:
    """The shell text of ``runcache run``'s COMMAND: one argument with spaces (or tabs,
    or newlines) is shell text already; else the arguments quoted, so the shell neither
    splits nor expands them."""
    args = list(argv)
    if len(args) == 1 and any(space in args[0] for space in " \t\n"):
        return args[0]
    return shlex.join(args)
