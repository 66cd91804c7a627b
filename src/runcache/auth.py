"""Bearer tokens for ``/api/*``: who may run commands, and who may manage the cache.

A server that runs commands is a remote shell, so once a token is configured
every ``/api/*`` request must present it. Administrative operations (emptying
the cache) need the admin token, which is the same token unless a separate one
is set. ``/health``, ``/livez`` and ``/openapi.json`` stay open: they show no
command output. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TypeVar

from flask import Flask, current_app, request

from runcache.config import Config
from runcache.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., object])

#: Requests under this prefix need a token once one is configured.
PROTECTED_PREFIX = "/api/"

_ADMIN_ATTRIBUTE = "_runcache_admin"


def admin_only(view: F) -> F:
    """Mark a view as an administrative operation: only the admin token may call it."""
    setattr(view, _ADMIN_ATTRIBUTE, True)
    return view


def init_app(app: Flask, config: Config) -> None:
    """Check the token before every protected request, if a token is configured."""
    if not config.token:
        return
    token = config.token.encode()
    admin = config.admin_secret.encode()

    @app.before_request
    def _check_token() -> None:
        if not request.path.startswith(PROTECTED_PREFIX):
            return
        presented = _bearer_token()
        if presented is None:
            _refuse("no bearer token")
            raise Unauthorized(
                "this server needs a token: send the header Authorization: Bearer <token>"
            )
        if _is_admin_request():
            if not hmac.compare_digest(presented, admin):
                _refuse("wrong admin token")
                raise Forbidden("this operation needs the admin token")
        elif not (hmac.compare_digest(presented, token) | hmac.compare_digest(presented, admin)):
            _refuse("wrong token")
            raise Forbidden("the token sent is not valid for this server")


def _bearer_token() -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, as bytes so any value compares safely."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value.encode("utf-8", "surrogateescape")


def _is_admin_request() -> bool:
    view = current_app.view_functions.get(request.endpoint or "")
    return bool(getattr(view, _ADMIN_ATTRIBUTE, False))


def _refuse(reason: str) -> None:
    log.warning(
        "%s refused %s %s: %s", request.remote_addr or "-", request.method, request.path, reason
    )
