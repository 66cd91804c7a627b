"""Store URLs and the one lookup that turns a URL into a store.

``memory://`` keeps results in this process; ``sqlite:///path/cache.db`` in a
file that survives restarts and that processes on one machine share;
``redis://host:port/db`` (or ``rediss://``, password in the URL) in a Redis that
instances on many machines share, and ``redis+cluster://host:port`` (or
``rediss+cluster://``) in a Redis Cluster, any of its nodes named. Each takes
``?namespace=NAME`` (default ``runcache``): stores with different namespaces in
one file or one Redis never see each other's entries or counts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from runcache.errors import ConfigError
from runcache.stores.base import DEFAULT_TIMEOUT, Store
from runcache.stores.memory import MemoryStore

__all__ = ["Store", "MemoryStore", "open_store", "SCHEMES", "DEFAULT_NAMESPACE", "DEFAULT_TIMEOUT"]

#: The namespace of a store URL that names none.
DEFAULT_NAMESPACE = "runcache"

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

Clock = Callable[[], float]


def _open_memory(
    url: str, max_entries: int, max_bytes: int, clock: Clock | None, timeout: float, retain: float
) -> Store:
    _split_namespace(url)
    return MemoryStore(max_entries, max_bytes, clock=clock or time.monotonic, retain=retain)


def _open_sqlite(
    url: str, max_entries: int, max_bytes: int, clock: Clock | None, timeout: float, retain: float
) -> Store:
    from runcache.stores.sqlite import SqliteStore

    path, namespace = sqlite_file(url)
    return SqliteStore(
        path,
        max_entries,
        max_bytes,
        namespace,
        clock=clock or time.time,
        timeout=timeout,
        retain=retain,
    )


def _open_redis(
    url: str, max_entries: int, max_bytes: int, clock: Clock | None, timeout: float, retain: float
) -> Store:
    scheme, _, rest = url.partition("://")
    cluster = scheme.endswith("+cluster")
    try:
        from runcache.stores.redis import RedisStore
    except ModuleNotFoundError as error:
        if error.name != "redis":
            raise
        raise ConfigError(
            f"store {url!r} needs the redis package: pip install 'runcache[redis]'"
        ) from None
    # redis-py reads redis:// and rediss://; the +cluster says which client to make.
    rest, namespace = _split_namespace(f"{scheme.removesuffix('+cluster')}://{rest}")
    return RedisStore.from_url(
        rest,
        max_entries,
        max_bytes,
        namespace,
        clock=clock or time.time,
        timeout=timeout,
        retain=retain,
        cluster=cluster,
    )


#: Each URL scheme and the function that opens a store for it.
SCHEMES: dict[str, Callable[[str, int, int, Clock | None, float, float], Store]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "redis": _open_redis,
    "rediss": _open_redis,
    "redis+cluster": _open_redis,
    "rediss+cluster": _open_redis,
}


def open_store(
    url: str,
    max_entries: int,
    max_bytes: int,
    clock: Clock | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retain: float = 0.0,
) -> Store:
    """Open the store a URL names; an unknown scheme names the valid ones.

    ``clock`` defaults to the monotonic clock for memory and to the wall clock
    for the stores that outlive the process or are shared between machines.
    Opening never connects: a store that is down makes the server run degraded.
    ``timeout`` bounds each call to a store that may hang (SQLite, Redis);
    ``retain`` is how long an expired entry is kept for stale answers.
    """
    scheme = urlsplit(url).scheme
    opener = SCHEMES.get(scheme)
    if opener is None:
        valid = ", ".join(f"{name}://" for name in SCHEMES)
        raise ConfigError(f"unknown store {url!r}: use one of {valid}")
    return opener(url, max_entries, max_bytes, clock, timeout, retain)


def _split_namespace(url: str) -> tuple[str, str]:
    """The URL without its ``namespace`` option, and the namespace (checked). The rest is
    kept as written: urlunsplit would turn ``sqlite:////abs`` into ``sqlite://abs``."""
    base, _, query = url.partition("?")
    options = parse_qsl(query, keep_blank_values=True)
    names = [value for name, value in options if name == "namespace"]
    namespace = names[-1] if names else DEFAULT_NAMESPACE
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(
            f"store namespace {namespace!r} must be 1 to 64 letters, digits, '.', '_' or '-'"
        )
    rest = urlencode([(name, value) for name, value in options if name != "namespace"])
    return (f"{base}?{rest}" if rest else base), namespace


def sqlite_file(url: str) -> tuple[Path, str]:
    """The file and the namespace a ``sqlite://`` URL names, for the cache and the job
    board alike: ``sqlite:///abs/cache.db`` (and SQLAlchemy's ``sqlite:////abs/cache.db``)
    is absolute, ``sqlite://relative/cache.db`` relative to the working directory."""
    rest, namespace = _split_namespace(url)
    parts = urlsplit(rest)
    if parts.query:
        raise ConfigError(f"store {url!r}: sqlite takes no options but namespace")
    path = parts.netloc + parts.path
    if not path:
        raise ConfigError(f"store {url!r} names no file: use sqlite:///path/to/cache.db")
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return Path(path), namespace
