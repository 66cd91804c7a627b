"""Clients of runcache: a server over HTTP (:mod:`.http`), or an engine in this process
(:mod:`.local`), sharing one base (:mod:`.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runcache.client.base import BaseClient


def connect(
    url: str | None, token: str | None = None, admin_token: str | None = None
) -> BaseClient:
    """A client for the server at ``url``, or an engine in this process when there is none
    (the engine's modules are imported only then: a client of a server starts faster)."""
    if url:
        from runcache.client.http import Client

        return Client(url, token, admin_token)
    from runcache.client.local import LocalClient

    return LocalClient.from_environment()
