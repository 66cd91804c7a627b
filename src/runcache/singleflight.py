"""Identical concurrent requests run once: the first runs, the rest wait for its answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.waiters = 0


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; callers arriving meanwhile share its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def run(self, key: str, call: Callable[[], T]) -> tuple[T, bool]:
        """Return ``call()``'s result and whether it came from another caller's run."""
        with self._lock:
            flight = self._flights.get(key)
            leading = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.waiters += 1
        if not leading:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value, True  # type: ignore[return-value]
        try:
            flight.value = call()
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.value, False

    def waiters(self, key: str) -> int:
        """How many callers are waiting for the run of ``key`` in flight now."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight is not None else 0

    def __len__(self) -> int:
        return len(self._flights)
