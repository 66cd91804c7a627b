"""Store URLs and the one lookup that turns a URL into a store."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

from runcache.errors import ConfigError
from runcache.stores.base import Store
from runcache.stores.memory import MemoryStore

__all__ = ["Store", "MemoryStore", "open_store", "SCHEMES"]


def _open_memory(url: str, max_entries: int, max_bytes: int, clock: Callable[[], float]) -> Store:
    return MemoryStore(max_entries, max_bytes, clock=clock)


#: Each URL scheme and the function that opens a store for it.
SCHEMES: dict[str, Callable[[str, int, int, Callable[[], float]], Store]] = {
    "memory": _open_memory,
}


def open_store(
    url: str,
    max_entries: int,
    max_bytes: int,
    clock: Callable[[], float] = time.monotonic,
) -> Store:
    """Open the store a URL names; an unknown scheme names the valid ones."""
    scheme = urlsplit(url).scheme
    opener = SCHEMES.get(scheme)
    if opener is None:
        valid = ", ".join(f"{name}://" for name in SCHEMES)
        raise ConfigError(f"unknown store {url!r}: use one of {valid}")
    return opener(url, max_entries, max_bytes, clock)
