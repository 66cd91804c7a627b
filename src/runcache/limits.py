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


#: Worker threads kept free of requests waiting for a slot, so that hits always
#: find a thread even while runs queue up.
THREADS_KEPT_FOR_HITS = 8


def waiting_limit(threads: int, slots: int) -> int:
    """How many requests may wait for a slot and still leave threads for hits."""
    spare = threads - slots
    return max(0, spare - min(THREADS_KEPT_FOR_HITS, spare // 2))


class Slots:
    """At most ``size`` holders at once; a caller waits at most ``wait`` seconds for a turn.

    At most ``max_waiting`` callers wait at once; past that a caller is refused
    at once, since each waiting request holds one of the server's threads.
    """

    def __init__(self, size: int, wait: float, max_waiting: int | None = None) -> None:
        self.size = size
        self.wait = wait
        self.max_waiting = size if max_waiting is None else max_waiting
        self._semaphore = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._held = 0
        self._waiting = 0

    @property
    def held(self) -> int:
        """How many slots are taken now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many callers are waiting for a slot now."""
        return self._waiting

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot for the block; Busy (a 503 with Retry-After) if none frees up in time."""
        if not self._semaphore.acquire(blocking=False):
            self._wait_for_turn()
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
            self._semaphore.release()

    def _wait_for_turn(self) -> None:
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise self._busy(f"and {self._waiting} requests are waiting for one")
            self._waiting += 1
        try:
            acquired = self._semaphore.acquire(timeout=self.wait)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise self._busy(f"for {self.wait:g}s")

    def _busy(self, detail: str) -> Busy:
        return Busy(
            f"all {self.size} command slots stayed busy {detail}; retry in {RETRY_AFTER_SECONDS}s",
            retry_after=RETRY_AFTER_SECONDS,
        )
