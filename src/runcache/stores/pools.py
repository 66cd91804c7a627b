"""What a server and its workers say about worker pools, without Redis: the queued task
and the one lookup that opens a store's pools (a pool's counts are a wire shape,
:class:`runcache.wire.PoolCounts`).

The queues themselves are :mod:`runcache.stores.redis_pools`; it imports redis-py,
which ``runcache serve`` on a memory or SQLite store must not need (the serve lock,
``requirements/serve.txt``, has no redis), so it is imported only for a redis:// store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

if TYPE_CHECKING:
    from runcache.stores.redis_pools import RedisPools

#: What the claim writes on a job whose worker stopped answering.
WORKER_STOPPED = "the worker running this job stopped answering"

#: The consumer group of every pool's stream.
GROUP = "workers"


class Task(msgspec.Struct, kw_only=True):
    """One command queued for a pool: the request as sent, and what the server decided."""

    job_id: str
    #: The request's JSON (a :class:`~runcache.wire.RunRequest`).
    request: bytes
    client: str
    credential: str
    identity: str
    background: bool
    retries: int = 0
    attempt: int = 0


def queue_name(pool: str) -> str:
    """What a job's record names as its instance while it waits in ``pool``'s queue."""
    return f"pool {pool} (queued)"


def open_pools(url: str, timeout: float) -> RedisPools | None:
    """The pools of the store ``url`` names: Redis's (``redis://``), else None."""
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return None  # not a Redis Cluster yet: its pools were neither built nor tested
    from runcache.stores import _split_namespace
    from runcache.stores.redis_pools import RedisPools

    rest, namespace = _split_namespace(url)
    return RedisPools(rest, namespace, timeout)


__all__ = ["GROUP", "WORKER_STOPPED", "Task", "open_pools", "queue_name"]
