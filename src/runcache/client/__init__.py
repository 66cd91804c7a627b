"""Clients of runcache: a server over HTTP (:mod:`.http`), or an engine in this process
(:mod:`.local`), sharing one base (:mod:`.base`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

#: typing.TYPE_CHECKING without importing typing: ``runcache run``'s light hit path
#: imports this package, and typing costs it milliseconds (type checkers read the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from runcache.client.base import BaseClient


def connect(
    url: str | None,
    token: str | None = None,
    admin_token: str | None = None,
    store: str | None = None,
) -> BaseClient:
    """A client for the server at ``url``, or an engine in this process when there is none,
    on ``store`` (else ``RUNCACHE_STORE``, else this user's cache: :func:`local_store`).
    The engine's modules are imported only then: a client of a server starts faster."""
    if url:
        from runcache.client.http import Client

        return Client(url, token, admin_token)
    from runcache.client.local import LocalClient

    return LocalClient.from_environment(store)


#: The variable that names the store, as for the server.
STORE_ENV = "RUNCACHE_STORE"


def local_store(environ: Mapping[str, str] | None = None) -> str:
    """The store of the client commands without a server: ``RUNCACHE_STORE`` when set,
    else a SQLite file of this user's, shared by every ``runcache run`` of theirs (as
    bkt's cache is): ``$XDG_CACHE_HOME/runcache/cache.db``, ``~/.cache`` when that is
    unset or not absolute (the XDG base directory rule). The store makes the directory."""
    environ = os.environ if environ is None else environ
    if environ.get(STORE_ENV):
        return environ[STORE_ENV]
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return "sqlite://" + os.path.join(base, "runcache", "cache.db")
