"""Who asks: a request's caller, and whose jobs it may see and owns.

Every way into the engine names its caller: the HTTP routes and MCP's ``/mcp`` from
what the token gate (:mod:`runcache.web.auth`) recorded in the request's ASGI scope,
the stdio MCP server and the in-process client as :data:`ANONYMOUS`. The engine
audits the caller and files the jobs it starts under the caller's identity, so the
rules of who sees what live here, once, for every way in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

#: The scope key where the token gate records which token a request it let in presented
#: (``"token"`` or ``"admin"``), for the MCP tools that need the admin token.
CREDENTIAL = "runcache.credential"

#: The scope key where the token gate records who presented the token: a plain token's
#: identity (:meth:`Config.plain_tokens <runcache.config.Config.plain_tokens>`), or
#: :data:`ADMIN` for the admin token.
IDENTITY = "runcache.identity"

#: The admin token's identity (and credential).
ADMIN = "admin"

#: The credential (and identity) of a request to a server without tokens.
ANONYMOUS = "anonymous"


class Caller(NamedTuple):
    """Who made a request: the peer's address and the credential it presented.
    (A named tuple, made for every request: a third of what a frozen dataclass costs.)"""

    client: str
    credential: str = ANONYMOUS
    identity: str = ANONYMOUS

    @property
    def owner(self) -> str | None:
        """The identity the jobs it starts or joins are filed under: None for an anonymous
        caller (a server without tokens, stdio, the in-process client), whose jobs are
        everyone's."""
        return None if self.credential == ANONYMOUS else self.identity


def caller_of(scope: Mapping[str, Any]) -> Caller:
    """The caller of an HTTP request, from its ASGI scope: the token gate records which
    token it let in (``token`` or ``admin``) and whose; without tokens there is no gate."""
    client = scope.get("client")
    return Caller(
        client[0] if client else "-",
        scope.get(CREDENTIAL, ANONYMOUS),
        scope.get(IDENTITY, ANONYMOUS),
    )


def viewer_of(scope: Mapping[str, Any]) -> str | None:
    """Whose jobs a request sees: a plain token's identity, or None (every job) for the
    admin token and on a server without tokens (no gate, so no credential)."""
    if scope.get(CREDENTIAL, ADMIN) == ADMIN:
        return None
    viewer: str = scope[IDENTITY]
    return viewer
