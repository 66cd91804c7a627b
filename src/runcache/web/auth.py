"""Bearer tokens for ``/api/*``: who may run commands, and who may manage the cache.

A server that runs commands is a remote shell, so once a token is configured
every ``/api/*`` request must present it, known path or not, and so must MCP's
``/mcp`` and the Prometheus figures at ``/metrics`` (a scraper sends the token
as ``Authorization: Bearer``, as Prometheus's ``authorization`` setting does).
Administrative operations (emptying the cache) need the admin token, which is
the same token unless a separate one is set. ``/health``, ``/livez`` and ``/openapi.json``
stay open: they show no command output. Tokens are compared in constant time
and never logged.

Identities. Each plain token is a client of its own (``--token-file`` may hold
several, one ``name token`` or ``token`` a line): the gate records who it let in
(:data:`IDENTITY`: the token's name, or a short digest of it, never the token),
and a job belongs to the identities of the requests that started or joined it.
A plain token sees and steers only those jobs (another's answers the 404 of an
unknown job, so it learns nothing of it); the admin token sees all of them, and
so does everyone on a server without tokens (:func:`viewer_of`).

The gate is plain ASGI in front of the routes, so a refused request costs no
routing and no request object, and a server without tokens has no gate at all.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from runcache.engine.callers import ADMIN, CREDENTIAL, IDENTITY
from runcache.errors import Forbidden, RuncacheError, Unauthorized
from runcache.web.responses import error_answer

log = logging.getLogger(__name__)

#: Requests under this prefix need a token once one is configured.
PROTECTED_PREFIX = "/api/"

#: MCP's Streamable HTTP endpoint: the same tools as the API, behind the same tokens.
MCP_PATH = "/mcp"

#: Prometheus metrics: counts of what the server ran, behind the same token as ``/api/*``.
METRICS_PATH = "/metrics"


class TokenGate:
    """Refuses ``/api/*``, ``/mcp`` and ``/metrics`` requests without the token, and admin
    routes without the admin token.

    ``tokens`` are the plain tokens, each with its identity; ``admin_routes`` are the
    (method, path) pairs only the admin token may call; a path may be a route's
    template (``/api/cache/entries/{cache_key}``).
    """

    def __init__(
        self,
        app: ASGIApp,
        tokens: Iterable[tuple[str, str]],
        admin_token: str,
        admin_routes: Iterable[tuple[str, str]],
    ) -> None:
        self.app = app
        self._tokens = [(identity, token.encode()) for identity, token in tokens]
        self._admin = admin_token.encode()
        admin_routes = list(admin_routes)
        self._admin_routes = frozenset(admin_routes)
        self._admin_templates = [
            (method, compile_path(path)[0]) for method, path in admin_routes if "{" in path
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_answer(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> RuncacheError | None:
        presented = _bearer_token(scope)
        if presented is None:
            _refuse(scope, "no bearer token")
            return Unauthorized(
                "this server needs a token: send the header Authorization: Bearer <token>"
            )
        if self._needs_admin(scope["method"], scope["path"]):
            if not hmac.compare_digest(presented, self._admin):
                _refuse(scope, "wrong admin token")
                return Forbidden("this operation needs the admin token")
        is_admin = hmac.compare_digest(presented, self._admin)
        identity = self._identity(presented)
        if identity is None and not is_admin:
            _refuse(scope, "wrong token")
            return Forbidden("the token sent is not valid for this server")
        scope[CREDENTIAL] = ADMIN if is_admin else "token"
        scope[IDENTITY] = ADMIN if is_admin else identity
        return None

    def _identity(self, presented: bytes) -> str | None:
        """Whose plain token ``presented`` is: every token is compared (in constant
        time), so how long it takes says nothing of which one matched."""
        found = None
        for identity, token in self._tokens:
            if hmac.compare_digest(presented, token):
                found = identity
        return found

    def _needs_admin(self, method: str, path: str) -> bool:
        return (method, path) in self._admin_routes or any(
            method == admin_method and template.match(path)
            for admin_method, template in self._admin_templates
        )


def _protected(path: str) -> bool:
    return (
        path.startswith(PROTECTED_PREFIX)
        or path == MCP_PATH
        or path.startswith(MCP_PATH + "/")
        or path == METRICS_PATH
    )


def _bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, as bytes so any value compares safely."""
    header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    scheme, _, value = header.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() != b"bearer" or not value:
        return None
    return value


def _refuse(scope: Scope, reason: str) -> None:
    """Log a refusal. The path is the requester's text, so it is quoted (as commands are):
    a newline or an escape sequence in it cannot forge a line or repaint a terminal."""
    client = scope.get("client")
    log.warning(
        "%s refused %s %r: %s",
        client[0] if client else "-",
        scope["method"],
        scope["path"],
        reason,
    )
