"""Execution slots: how many commands may run at once, and how long a request waits for one.

Only a real run takes a slot. Cache hits and requests sharing another
request's run never wait for one, so a server whose slots are all busy still
answers everything it has cached at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from runcache.errors import Busy

#: What a 503 tells a client to wait before trying again. Commands mostly wait
#: on the network for seconds, so a slot is likely free again a few seconds on;
#: much shorter would have clients hammer a server that is already full.
RETRY_AFTER_SECONDS = 5


class Slots:
    """At most ``size`` holders at once; a caller waits at most ``wait`` seconds for a turn."""

    def __init__(self, size: int, wait: float) -> None:
        self.size = size
        self.wait = wait
        self._semaphore = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        """How many slots are taken now."""
        return self._held

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot for the block; Busy (a 503 with Retry-After) if none frees up in time."""
        if not self._semaphore.acquire(timeout=self.wait):
            raise Busy(
                f"all {self.size} command slots stayed busy for {self.wait:g}s; "
                f"retry in {RETRY_AFTER_SECONDS}s",
                retry_after=RETRY_AFTER_SECONDS,
            )
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
            self._semaphore.release()
