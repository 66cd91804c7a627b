"""Policies: what a server does with a command unless its request says otherwise.

Agents should not have to say every time that ``git status`` keys on the
repository, that ``pytest`` results hold until the code changes, or that
``curl`` must not be cached. ``--policy FILE`` names a TOML file of rules::

    [[rule]]
    program = "git"             # the command's program (its first word's base name)
    inputs = ["git:"]
    ttl = 600

    [[rule]]
    match = "pytest*"           # or a shell-style pattern on the whole command
    inputs = ["**/*.py", "pyproject.toml"]
    cache_exit_codes = [0, 1]

    [[rule]]
    program = "curl"
    cache = false

The first rule that matches applies: it sets ``ttl``, ``stale``, ``timeout``,
``inputs``, ``cache_exit_codes`` and ``scope`` where the request leaves them out (a
request's own value wins, within the server's bounds as ever), and ``cache =
false`` makes every run of the command run and store nothing. A file that is not
such rules is refused at start with one line naming the rule
(:class:`~runcache.errors.ConfigError`). ``GET /api/policy`` shows the rules.
"""

from __future__ import annotations

import fnmatch
import os
import shlex

import msgspec

from runcache import wire
from runcache.errors import BadRequest, ConfigError


class Policy:
    """The rules of ``--policy`` (none without it), matched in order."""

    def __init__(self, rules: list[wire.PolicyRule], source: str = "") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def load(cls, path: str) -> Policy:
        """The rules in ``path``; ConfigError names what is wrong, and which rule."""
        if not path:
            return cls([])
        try:
            with open(path, "rb") as file:
                text = file.read()
        except OSError as error:
            raise ConfigError(f"policy {path!r} cannot be read: {error.strerror}") from None
        try:
            raw = msgspec.toml.decode(text)
        except msgspec.DecodeError as error:
            raise ConfigError(f"policy {path!r} is not TOML: {error}") from None
        if not isinstance(raw, dict) or set(raw) - {"rule"}:
            raise ConfigError(f"policy {path!r} holds only [[rule]] tables")
        rules = raw.get("rule", [])
        if not isinstance(rules, list):
            raise ConfigError(f"policy {path!r}: rule must be [[rule]] tables")
        return cls([_rule(path, number, table) for number, table in enumerate(rules, 1)], path)

    def applied_to(self, request: wire.RunRequest) -> wire.RunRequest:
        """``request`` with the first matching rule's values where it left them out."""
        for rule in self.rules:
            if _matches(rule, request.command):
                return _applied(rule, request)
        return request

    def answer(self) -> wire.PolicyAnswer:
        return wire.PolicyAnswer(source=self.source, rules=self.rules)


def _matches(rule: wire.PolicyRule, command: str) -> bool:
    if rule.match is not None:
        return fnmatch.fnmatchcase(command, rule.match)
    return program_of(command) == rule.program


def _applied(rule: wire.PolicyRule, request: wire.RunRequest) -> wire.RunRequest:
    """``request`` with ``rule``'s values where it left them out."""
    fields: dict[str, object] = {
        name: value
        for name in ("ttl", "stale", "timeout", "inputs", "cache_exit_codes", "scope")
        if getattr(request, name) is None and (value := getattr(rule, name)) is not None
    }
    if not rule.cache:
        if request.refresh:
            raise BadRequest(
                "refresh stores the new result, and this server's policy caches nothing "
                "of this command"
            )
        fields["use_cache"] = False
    return msgspec.structs.replace(request, **fields) if fields else request


def _rule(path: str, number: int, table: object) -> wire.PolicyRule:
    where = f"policy {path!r}, rule {number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: a rule is a [[rule]] table")
    named = table.get("match") or table.get("program")
    if named is not None:
        where += f" ({'match' if 'match' in table else 'program'} {named!r})"
    try:
        rule = wire.decode_request(wire.PolicyRule, msgspec.json.encode(table))
    except BadRequest as error:
        raise ConfigError(f"{where}: {error.message}") from None
    if (rule.match is None) == (rule.program is None):
        raise ConfigError(f'{where}: give exactly one of "match" and "program"')
    return rule


def program_of(command: str) -> str:
    """The base name of a command's program: its first word, as the shell splits it."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return os.path.basename(words[0]) if words else ""
