"""A request's run context (``cwd``, ``env``, ``stdin``): checked against the server's
rules, and turned into the part of the cache key that keeps contexts apart.

A result depends on where a command runs, what it sees and what it reads, so two
requests with the same command but another context never share a result. A
request that gives no context keeps the key it always had.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import msgspec

from runcache.errors import BadRequest, Forbidden
from runcache.run.run_as import OWN_PREFIX, is_own
from runcache.run.runner import NO_CONTEXT, HeldDirectory, RunContext
from runcache.wire import RunRequest

#: Encodes a context with its keys sorted, so equal contexts give equal cache keys
#: (an encoder made once: a hit with a context encodes one).
_SORTED = msgspec.json.Encoder(order="sorted")


class ContextRules:
    """What a server lets a request's context be.

    ``cwd_roots`` (``--allow-cwd``): a ``cwd`` must resolve, symbolic links
    followed, to one of them or a directory below. ``env_names``
    (``--env-allow``): the only variables ``env`` may set. In allowlist mode a
    request's ``env`` needs ``--env-allow``, since a variable such as
    ``LD_PRELOAD`` or ``GIT_SSH_COMMAND`` would let an allowed program run others.
    ``env`` never sets runcache's own variables (``RUNCACHE_*``), whatever the rules.
    What these rules refuse is a 403 (the server's policy); a ``cwd`` that is not a
    directory is a 400. A ``cwd`` is opened when it is checked, and the run enters
    the directory opened, not whatever its path names when a slot frees.
    """

    def __init__(
        self, cwd_roots: Sequence[str], env_names: Sequence[str], allowlist_mode: bool
    ) -> None:
        self.cwd_roots = tuple(os.path.realpath(root) for root in cwd_roots)
        self.env_names = frozenset(env_names)
        self.allowlist_mode = allowlist_mode

    def check(self, request: RunRequest) -> RunContext:
        """The context to run ``request`` in; BadRequest or Forbidden says what is wrong."""
        if request.cwd is None and not request.env and not request.stdin and not request.pass_env:
            return NO_CONTEXT
        env = self._env(request.env, "env") if request.env else None
        passed = self._env(request.pass_env, "pass_env") if request.pass_env else None
        held = None if request.cwd is None else self._cwd(request.cwd)
        return RunContext(
            cwd=None if held is None else held.path,
            env=env,
            stdin=request.stdin.encode() if request.stdin else None,
            held=held,
            passed_env=passed,
        )

    def _cwd(self, asked: str) -> HeldDirectory:
        # Opened, then checked by the path of what was opened: the run enters this very
        # directory, whatever a link swapped into its path does meanwhile.
        try:
            held = HeldDirectory(os.open(asked, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError:
            raise BadRequest(f"cwd {asked!r} is not an existing directory") from None
        resolved = held.path
        if self.cwd_roots and not any(within(resolved, root) for root in self.cwd_roots):
            raise Forbidden(
                f"cwd {asked!r} is outside the directories this server allows "
                f"(--allow-cwd): {', '.join(self.cwd_roots)}"
            )
        return held

    def _env(self, asked: Mapping[str, str], field: str) -> Mapping[str, str]:
        """``env`` or ``pass_env`` (``field``), checked by the same rules."""
        own = sorted(name for name in asked if is_own(name))
        if own:
            raise Forbidden(
                f"{field} may not set runcache's own variables ({OWN_PREFIX}*): "
                f"not {', '.join(own)}"
            )
        if self.allowlist_mode and not self.env_names:
            raise Forbidden(
                f"{field} is refused in allowlist mode unless the server names the "
                "variables a request may set (--env-allow)"
            )
        refused = sorted(name for name in asked if self.env_names and name not in self.env_names)
        if refused:
            raise Forbidden(
                f"{field} may set only the variables --env-allow names "
                f"({', '.join(sorted(self.env_names))}): not {', '.join(refused)}"
            )
        return dict(asked)


def key_part(context: RunContext) -> bytes:
    """What a context adds to a command's cache key: nothing when there is none (its
    ``passed_env`` never counts: that is what it is for)."""
    if context is NO_CONTEXT or (context.cwd is None and not context.env and not context.stdin):
        return b""
    described = {
        "cwd": context.cwd,
        "env": dict(context.env or {}),
        "stdin": (context.stdin or b"").decode(),
    }
    return b"\0" + _SORTED.encode(described)


def within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it (both resolved already)."""
    return path == root or path.startswith(root.rstrip("/") + "/")
